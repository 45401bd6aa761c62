"""Proof that pre-training learns: linear-probe accuracy of one encoder at random init, after mae and after can.

    python -m bench.learning [--steps 150] [--batch-size 64] [--out runs/bench_learning]

Data: sklearn's load_digits (1,797 real 8 x 8 scans of handwritten digits, 10 classes), upscaled to IMG px RGB,
split stratified with a fixed seed into 1,400 training and 397 validation images, written as labelled shards by
tools/shard.py (--labels-from-folders). Each recipe pre-trains vit_tiny (patch 4) on the training shards through
the real trainer (jobs/pretrain.py, one process, jobs/configs/digits_cpu.yaml) for the same number of steps; then
jobs.linear_probe extracts frozen mean-pooled features and trains the BN + Linear probe. Prints one table and writes
OUT/learning.json.

Measured (python -m bench.learning --steps 60 --batch-size 64 --img-size 16; 2 CPU cores shared at load ~7, 637 s):
    | encoder     | top-1 % | top-5 % |
    | random init | 92.2    | 100.0   |
    | mae         | 93.5    | 99.7    |
    | can         | 94.2    | 100.0   |
Digits are nearly linearly separable from raw pixels, so the random-init baseline is high; this budget gives can
+2.0 points, short of the 5 the issue asks for (tests/eval/test_learning.py is xfail(strict=True) until it does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.eval.probe import ProbeConfig
from jobs.launch import Dist
from jobs.linear_probe import LinearProbeConfig, linear_probe
from model.can import build_model
from model.config import ModelConfig
from model.export import export_encoder
from tools import shard

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "digits_cpu.yaml"
# Per recipe: the trainer overrides that make it (mae sees one crop + flip view, CAN_SPEC.md's recipe table).
RECIPES: dict[str, list[str]] = {
    "mae": ["model.recipe=mae", "data.num_views=1", "data.augment=mae"],
    "can": ["model.recipe=can", "data.num_views=2", "data.augment=can"],
}
log = logging.getLogger("bench.learning")


@dataclass(frozen=True)
class Budget:
    steps: int = 150  # optimizer steps per recipe, the same for every recipe
    batch_size: int = 64
    img_size: int = 32  # digits are upscaled from 8 px; patch 4
    probe_epochs: int = 100
    seed: int = 0


def write_digit_dumps(root: Path, img_size: int, seed: int) -> dict[str, Path]:
    """ROOT/{train,val}/{digit}/NNNN.png: a stratified 1,400 / 397 split of load_digits, fixed by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(digits.target)), train_size=1400, stratify=digits.target,
                                          random_state=seed)
    dumps = {}
    for split, idx in (("train", idx_train), ("val", idx_val)):
        for i in idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)  # values 0..16
            img = Image.fromarray(pixels).resize((img_size, img_size), Image.BILINEAR).convert("RGB")
            img.save(folder / f"{i:04d}.png")  # lossless: the shard writer makes the one JPEG
        dumps[split] = root / split
    return dumps


def shard_dump(dump: Path, out: Path, img_size: int) -> str:
    """tools/shard.py on one dump; returns the shard prefix. --min-side: the images are only img_size px."""
    rc = shard.main([str(dump), "--output", str(out), "--labels-from-folders", "--min-side", str(img_size // 2),
                     "--dedup", "none", "--samples-per-shard", "400", "--workers", "1", "--quiet", "--overwrite"])
    if rc != 0:
        raise RuntimeError(f"tools/shard.py failed on {dump}")
    return str(out) + "/"


def pretrain(recipe: str, shards: str, out: Path, budget: Budget) -> Path:
    """One process of jobs/pretrain.py; returns the exported encoder.safetensors."""
    b = budget
    sets = RECIPES[recipe] + [
        f"data.shards={shards}", f"output_dir={out}", f"seed={b.seed}", f"data.batch_size={b.batch_size}",
        f"optim.global_batch={b.batch_size}", f"schedule.total_samples={b.steps * b.batch_size}",
        f"schedule.warmup_samples={max(1, b.steps // 10) * b.batch_size}", f"model.img_size={b.img_size}",
        f"data.img_size={b.img_size}", "checkpoint.resume=false",
    ]
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pretraining {recipe} failed:\n{proc.stderr[-4000:]}")
    log.info("%s: %d steps of %d images in %.0f s", recipe, b.steps, b.batch_size, time.monotonic() - t0)
    return out / "encoder.safetensors"


def random_init_encoder(out: Path, budget: Budget) -> Path:
    """The encoder exactly as the trainer initialises it (seeded build_model), exported like a trained one."""
    torch.manual_seed(budget.seed)
    model = build_model(ModelConfig(preset="vit_tiny", img_size=budget.img_size, patch_size=4))
    export_encoder(model.state_dict(), out / "encoder.safetensors", preset="vit_tiny")
    return out / "encoder.safetensors"


def probe(encoder: Path, shards: dict[str, str], out: Path, budget: Budget) -> dict:
    """jobs.linear_probe in this process (one rank, no process group: features are gathered trivially)."""
    cfg = LinearProbeConfig(
        encoder=str(encoder), train_shards=shards["train"], val_shards=shards["val"], output=str(out / "probe.json"),
        batch_size=200, workers=1,
        probe=ProbeConfig(optimizer="sgd", base_lr=0.1, epochs=budget.probe_epochs, warmup_epochs=5, batch_size=256),
    )
    return linear_probe(cfg, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def run(out: Path, budget: Budget) -> dict[str, dict]:
    """The whole comparison; returns {encoder: probe result} for "random init", "mae", "can"."""
    dumps = write_digit_dumps(out / "dump", budget.img_size, budget.seed)
    shards = {split: shard_dump(dumps[split], out / "shards" / split, budget.img_size) for split in dumps}
    encoders = {"random init": random_init_encoder(out / "random", budget)}
    for recipe in RECIPES:
        encoders[recipe] = pretrain(recipe, shards["train"], out / recipe, budget)
    results = {name: probe(path, shards, out / name.replace(" ", "_"), budget) for name, path in encoders.items()}
    (out / "learning.json").write_text(json.dumps({"budget": budget.__dict__, "results": results}, indent=2))
    return results


def format_table(results: dict[str, dict], budget: Budget) -> str:
    lines = [f"linear probe on 397 held-out digits (vit_tiny/4 at {budget.img_size} px, {budget.steps} steps x "
             f"{budget.batch_size} images per recipe)",
             "| encoder | top-1 % | top-5 % | train top-1 % |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['top1']:.1f} | {r['top5']:.1f} | {r['train_top1']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Budget()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="runs/bench_learning")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budget = Budget(a.steps, a.batch_size, a.img_size, a.probe_epochs, a.seed)
    t0 = time.monotonic()
    results = run(Path(a.out), budget)
    print(format_table(results, budget))
    print(f"total {time.monotonic() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
