"""Training-step throughput and MFU of the trainer's own step, for the can and simclr recipes, one lever at a time.

    python -m bench.train                                   # the suite for this machine (below), synthetic batches
    python -m bench.train --loader --out train.json         # + the real loader (data-wait share), results as JSON
    python -m bench.train --preset vit_large --batch 64 --precision amp_bf16 --compile blocks     # one lever changed

Suites (--suite; default "h100" when CUDA is present, else "cpu"): h100 = vit_base (micro-batch 256) and vit_large
(micro-batch 128) at 224 px, patch 16, each for can and simclr (four rows, plus the loader rows with --loader); cpu =
vit_tiny and vit_small at 32 px, patch 4, decoder 128/2/4, micro-batch 16 (a smoke run: CPU figures say nothing about the GPU).
--preset / --img-size / --patch-size / --batch replace the suite by one case.

Per row: images/s per device (median over the timed steps after --warmup), step time, MFU (model.flops cost model of
the exact config run / the device's peak, jobs.metrics.PEAK_FLOPS; null on CPU unless --peak-flops), the share of the
step spent waiting for data, and peak memory (torch.cuda.max_memory_allocated, reset per row; host RSS peak of the
process on CPU); then the SimCLR / CAN step-time ratio per preset (the cost model predicts 1.71 for ViT-L/16, 1.25
for ViT-B/16). The step is jobs.step.train_step in the engine jobs.engine.build_engine makes, and every per-step
figure comes from the trainer's jobs.metrics.Window over a window of one step, so the trainer's logged images/s and
MFU and these are one definition (tests/jobs/test_mfu_agrees.py). Levers, each a flag: --precision (DeepSpeed bf16
weights vs torch autocast), --compile (the trainer's deepspeed.compile: blocks compiled on CUDA by default),
--batch (micro-batch), --grad-accum, --zero, --checkpoint-activations.
--loader without --shards writes JPEG shards of natural photos (bench.pipeline.web_like_jpegs) to a temporary folder.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from jobs.config import DeepSpeedConfig, OptimConfig
from jobs.derived import Derived, derive
from jobs.engine import build_engine, resolve_runtime
from jobs.launch import Dist, init_distributed
from jobs.metrics import TimedIterator, Window, memory_stats, peak_flops
from jobs.metrics import mfu as metrics_mfu
from jobs.step import train_step
from model.build import build_model
from model.config import ModelConfig
from model.flops import train_flops_per_image
from pipeline.config import AugmentConfig, DataConfig


@dataclass(frozen=True)
class Case:
    preset: str
    img_size: int
    patch_size: int | None  # None = the preset's
    batch: int  # micro-batch per device
    decoder: tuple[int, int, int] | None = None  # (dim, depth, heads); None = the --decoder-* flags (MAE's 512/8/16)


SUITES: dict[str, list[Case]] = {
    # Micro-batches that fit 80 GB in bf16 with flash attention for both recipes (SimCLR's 197-token views are the
    # larger); the same batch for can and simclr so their step times compare like for like.
    "h100": [Case("vit_base", 224, None, 256), Case("vit_large", 224, None, 128)],
    # The demo's shape (jobs/configs/demo_cpu.yaml): 32 px, patch 4, a 128-wide 2-block decoder.
    "cpu": [Case("vit_tiny", 32, 4, 16, (128, 2, 4)), Case("vit_small", 32, 4, 16, (128, 2, 4))],
}


@dataclass(frozen=True)
class Levers:
    precision: str = "auto"  # jobs.config.DeepSpeedConfig.precision: bf16 (DeepSpeed), amp_bf16 (autocast), fp32
    compile: str = "auto"  # jobs.config.DeepSpeedConfig.compile: auto (blocks on CUDA) | blocks | off
    zero_stage: int = 2
    grad_accum: int = 1
    checkpoint_activations: bool = False  # recompute each block in backward (memory for ~1/3 more forward FLOPs)


def mfu(images_per_s: float, cfg: ModelConfig, peak: float | None) -> float | None:
    """MFU as the trainer logs it: jobs.metrics.mfu with model.flops.train_flops_per_image of this exact config."""
    return metrics_mfu(images_per_s, train_flops_per_image(cfg), peak)


def synthetic_batches(batch: int, img_size: int, num_patches: int, num_views: int, device: torch.device):
    """The same batch forever, made once on the device: no data cost at all."""
    b = {"keys": [str(i) for i in range(batch)], "labels": torch.zeros(batch, dtype=torch.long, device=device)}
    for v in range(1, num_views + 1):
        b[f"view{v}"] = torch.randn(batch, 3, img_size, img_size, device=device)
        b[f"mask_keys{v}"] = torch.rand(batch, num_patches, device=device)
    while True:
        yield b


def write_photo_shards(root: str, images: int, per_shard: int = 256) -> str:
    """Shards of natural-photo JPEGs (320-512 px): decode cost like web images, unlike random noise."""
    from bench.pipeline import web_like_jpegs
    from pipeline.ingest.writer import write_shard

    jpegs = web_like_jpegs(images)
    for s in range(0, images, per_shard):
        write_shard(os.path.join(root, f"shard-{s // per_shard:06d}.tar"),
                    [(f"img{i:07d}", {"jpg": jpegs[i]}) for i in range(s, min(images, s + per_shard))])
    return root + "/"


def loader_batches(shards: str, cfg: ModelConfig, batch: int, num_views: int, device: torch.device, threads: int):
    from pipeline.loader import build_loader

    data = DataConfig(shards=shards, batch_size=batch, img_size=cfg.img_size, patch_size=cfg.resolved_patch_size,
                      num_views=num_views, augment=AugmentConfig.preset("simclr" if cfg.recipe == "simclr" else "can"),
                      workers=2, dali_threads=threads, validate="header", device=device.type)
    return build_loader(data, 0, 1, device)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Recompute each transformer block in the backward pass, in place (parameter names unchanged)."""
    for block in (b for b in model.modules() if type(b).__name__ == "Block"):
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def make_engine(model: torch.nn.Module, levers: Levers, derived: Derived, device: torch.device):
    """The trainer's engine (jobs.engine.build_engine) with the levers' DeepSpeed settings; returns it and its
    runtime (precision, compile) as the trainer resolves it."""
    optim = OptimConfig(global_batch=derived.global_batch)
    ds = DeepSpeedConfig(zero_stage=levers.zero_stage, precision=levers.precision, compile=levers.compile)
    runtime = resolve_runtime(ds, optim.name, model, device.type == "cuda")
    return build_engine(model, optim, ds, derived, runtime), runtime


def bench_one(cfg: ModelConfig, case: Case, levers: Levers, steps: int, warmup: int, source: str,
              shards: str | None, dist: Dist, peak: float | None, threads: int) -> dict:
    """Times `steps` optimizer steps (after `warmup`) of one config fed by `source` ("synthetic" or "loader")."""
    device = dist.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(cfg)
    if levers.checkpoint_activations:
        checkpoint_activations(model)
    global_batch = case.batch * levers.grad_accum
    derived = derive(global_batch, case.batch, 1, 1e-4, 256, global_batch * (steps + warmup), 0)
    engine, runtime = make_engine(model, levers, derived, device)
    loader = None
    if source == "synthetic":
        it = synthetic_batches(case.batch, cfg.img_size, model.num_patches, model.num_views, device)
    else:
        loader = loader_batches(shards, cfg, case.batch, model.num_views, device, threads)
        it = iter(loader)
    batches, window, flops = TimedIterator(it), Window(device), train_flops_per_image(cfg)
    records = []
    for i in range(warmup + steps):
        window.reset(batches.wait_s)
        out = train_step(engine, batches, derived.grad_accum, 1e-4)
        window.add(out.losses)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's end; the trainer syncs only once per logging window
        # The trainer's own figures for a window of one step (its .tolist() reads the losses).
        rec = window.reduce(batches.wait_s, derived.micro_batch * derived.grad_accum, flops, peak)
        if i >= warmup:
            records.append(rec)
    if loader is not None:
        loader.close()
    ips = statistics.median(r["images_per_s_per_device"] for r in records)
    result = {"recipe": cfg.recipe, "preset": cfg.preset, "img_size": cfg.img_size, "patch_size": cfg.resolved_patch_size,
              "decoder": [cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads], "micro_batch": case.batch,
              "source": source, "precision": runtime.precision, "compiled": runtime.compile,
              "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                                else engine.optimizer).__name__,
              "step_s": statistics.median(r["step_time_s"] for r in records),
              "images_per_s_per_device": ips, "train_gflops_per_image": flops / 1e9,
              "achieved_tflops": ips * flops / 1e12, "mfu": mfu(ips, cfg, peak),
              "data_wait_share": statistics.median(r["data_wait_share"] for r in records),
              "loss_last": records[-1]["loss"], **memory_stats(device)}
    del engine, model, out, batches, it
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def step_time_ratios(results: list[dict]) -> list[dict]:
    """SimCLR / CAN step time per (preset, img size, source) where both ran, beside the cost model's prediction."""
    by = {(r["preset"], r["img_size"], r["source"], r["recipe"]): r for r in results if "step_s" in r}
    ratios = []
    for (preset, size, source, recipe), can in by.items():
        simclr = by.get((preset, size, source, "simclr"))
        if recipe == "can" and simclr is not None:
            ratios.append({"preset": preset, "img_size": size, "source": source,
                           "simclr_over_can_step_time": simclr["step_s"] / can["step_s"],
                           "predicted": simclr["train_gflops_per_image"] / can["train_gflops_per_image"]})
    return ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default=None, help="default: h100 with CUDA, else cpu")
    p.add_argument("--preset", default=None, help="one case instead of the suite")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="micro-batch per device (overrides the suite's)")
    p.add_argument("--recipes", nargs="+", default=["can", "simclr"])
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--precision", choices=["auto", "bf16", "amp_bf16", "fp32"], default="auto")
    p.add_argument("--compile", choices=["auto", "blocks", "off"], default="auto")
    p.add_argument("--zero", type=int, choices=[1, 2, 3], default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-activations", action="store_true")
    p.add_argument("--loader", action="store_true", help="also time with the real loader (data-wait share)")
    p.add_argument("--shards", default=None, help="shard URL for --loader (default: photo shards in a temp dir)")
    p.add_argument("--dali-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (default: the table)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def cases_of(args: argparse.Namespace, on_cuda: bool) -> list[Case]:
    if args.preset is not None:
        return [Case(args.preset, args.img_size, args.patch_size, args.batch or 8)]
    suite = SUITES[args.suite or ("h100" if on_cuda else "cpu")]
    return [Case(c.preset, c.img_size, c.patch_size, args.batch or c.batch, c.decoder) for c in suite]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist = init_distributed()
    on_cuda = dist.device.type == "cuda"
    steps = args.steps if args.steps is not None else (20 if on_cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    levers = Levers(args.precision, args.compile, args.zero, args.grad_accum, args.checkpoint_activations)
    peak = peak_flops(dist.device, args.peak_flops)
    device_name = torch.cuda.get_device_name(dist.device) if on_cuda else platform.processor() or "cpu"
    print(f"device: {device_name}, peak {peak}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}; levers {asdict(levers)}; {steps} timed steps after {warmup}")
    sources = ["synthetic"] + (["loader"] if args.loader else [])
    cases = cases_of(args, on_cuda)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if args.loader and shards is None:
            shards = write_photo_shards(tmp, images=min(2048, 4 * max(c.batch for c in cases)))
        for case in cases:
            for recipe in args.recipes:
                dim, depth, heads = case.decoder or (args.decoder_dim, args.decoder_depth, args.decoder_heads)
                cfg = ModelConfig(preset=case.preset, img_size=case.img_size, patch_size=case.patch_size,
                                  recipe=recipe, decoder_dim=dim, decoder_depth=depth, decoder_heads=heads)
                for source in sources:
                    try:
                        results.append(bench_one(cfg, case, levers, steps, warmup, source, shards, dist, peak,
                                                 args.dali_threads))
                    except torch.OutOfMemoryError as e:  # a lever that does not fit is a result, not a crash
                        results.append({"recipe": recipe, "preset": case.preset, "micro_batch": case.batch,
                                        "source": source, "error": f"out of memory: {str(e).splitlines()[0]}"})
                        gc.collect()
                        torch.cuda.empty_cache()
                    print(json.dumps(results[-1]), flush=True)
    ratios = step_time_ratios(results)
    for r in ratios:
        print(f"{r['preset']} {r['source']}: SimCLR / CAN step time {r['simclr_over_can_step_time']:.2f} "
              f"(FLOPs model predicts {r['predicted']:.2f})")
    report = {"device": device_name, "peak_flops": peak, "torch": torch.__version__, "levers": asdict(levers),
              "steps": steps, "warmup": warmup, "results": results, "ratios": ratios}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    torch.distributed.destroy_process_group()
    return report


if __name__ == "__main__":
    main()
