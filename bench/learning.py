"""Proof that pre-training learns: linear-probe accuracy of one encoder at random init, after mae and after can.

    python -m bench.learning [--steps N] [--batch-size B] [--patch-size P] [--base-lr LR] [--out runs/bench_learning]

Data: sklearn's load_digits (1,797 real 8 x 8 scans of handwritten digits, 10 classes), upscaled to IMG px RGB,
split stratified with a fixed seed into 1,400 training and 397 validation images, written as labelled shards by
tools/shard.py (--labels-from-folders). Each recipe pre-trains vit_tiny on the training shards through the real
trainer (jobs/pretrain.py, one process, jobs/configs/digits_cpu.yaml) for the same number of steps; then
jobs.linear_probe extracts frozen mean-pooled features and trains the BN + Linear probe (same probe budget for every
row). Beside the probe: weighted kNN (k=20) on the same features, and a raw-pixel reference row (the probe and kNN on
the eval-mode pixels themselves), which says how much headroom the task leaves above random features.
Prints one table and writes OUT/learning.json.

Measured (python -m bench.learning, the defaults below: 60 steps x 64, vit_tiny/8 at 32 px, base_lr 1.5e-3 -> peak
3.75e-4; 2 CPU cores shared with other jobs, load average 3-7, 637 s in all, can's 60 steps alone 514 s at load ~7),
with the can preset's views (crop 0.2-1, flip, jitter, grayscale, blur; mae: crop 0.2-1 + flip):
    | encoder     | top-1 % | top-5 % | train top-1 % | kNN top-1 % |
    | raw pixels  | 94.0    | 100.0   | 100.0         | 97.2        |
    | random init | 91.7    | 99.7    | 97.6          | 72.5        |
    | mae         | 90.4    | 99.7    | 96.7          | 66.0        |
    | can         | 90.7    | 99.5    | 96.1          | 64.2        |
Other budgets measured for can (same data, probe and seed): 8 x 64 at peak lr 5e-4: 86.4; 40 x 128 at 2e-3: 85.6;
100 x 128 at 4e-3: 77.1 (kNN 41.8). Random init at patch 4 instead of 8: 95.7 (raw-pixel probe 94.5, kNN 97.2).
Since then digits_cpu.yaml takes digit-suited views for both recipes (crop 0.5-1, no flip, no saturation / hue /
grayscale / blur; can keeps brightness / contrast jitter, mae none). With them, at the same defaults:
(624 s in all at load 4-7: mae's 60 steps 209 s, can's 154 s)
    | encoder     | top-1 % | top-5 % | train top-1 % | kNN top-1 % |
    | raw pixels  | 94.0    | 100.0   | 100.0         | 97.2        |
    | random init | 91.7    | 99.7    | 97.8          | 72.5        |
    | mae         | 89.9    | 99.7    | 96.5          | 64.2        |
    | can         | 91.2    | 99.5    | 96.1          | 64.5        |
Longer runs with those views (an in-process loop outside the trainer: the same CANModel, AdamW betas (0.9, 0.95),
wd 0.05, warm-up 10 % + cosine, grad clip 1, batch 64, torch crops instead of DALI, the same probe; 1 thread each on
the loaded machine, load ~7), probe top-1 % of can vs the same encoder at random init, by epoch of 1,400 images:
    | encoder (base lr)          | random | ep 3 | ep 6 | ep 9 | ep 12 (end of cosine) | img/s |
    | 192 wide, 4 deep (1.5e-3)  | 93.2   | 91.9 | 92.7 | 93.5 | 94.0 (+0.8)          | 31-37 |
    | 192 wide, 4 deep (5e-3)    | 93.2   | 83.1 | (stopped)                           | 36    |
    | 192 wide, 2 deep (3e-3)    | 92.9   | 89.9 | 90.4 | 91.9 | 92.4 (-0.5)          | 43-57 |
So within CPU minutes pre-training does NOT beat random init by 5 points on this task. The first 3-6 epochs of a
reconstruction-dominated objective make mean-pooled features less linearly separable (InfoNCE, weighted 0.03, is
still near chance: 4.3 of ln 127 = 4.8 at epoch 3); digit-suited views and a shallower encoder shorten the dip, and
can overtakes random init after ~9 epochs (4 deep), gaining ~0.5 point per 3 epochs after that. The task also leaves
little headroom: random features already probe at 92-96 %, near the raw-pixel linear probe (94 %), so +5 points
means can >= 96.7 at patch 8 (98.2 for the 4-deep encoder), above the raw-pixel probe. 12 epochs took ~9 min at
31 img/s (load ~7; on a quiet 2-core machine we estimate, without having measured it, 2-3x faster: 3-5 min). The
runs end on their cosine schedule, so a longer run needs a new schedule, not more epochs of this one. At ~0.6 point
per 3 epochs, +5 would take several times 12 epochs, so it does not fit the test's budget. tests/eval/test_learning.py asserts the issue's +5 and is xfail(strict=True)
until a budget that reaches it is found.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.eval.features import Features
from jobs.eval.knn import knn_accuracy
from jobs.eval.probe import ProbeConfig
from jobs.launch import Dist
from jobs.linear_probe import LinearProbeConfig, eval_data_config, linear_probe, run_probe
from model.can import build_model
from model.config import ModelConfig
from model.export import export_encoder
from pipeline.loader import build_loader
from tools import shard

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "digits_cpu.yaml"
# Per recipe: the trainer overrides that make it. The augment preset is the recipe's (CAN_SPEC.md: mae sees one
# crop-only view, no jitter); digits_cpu.yaml's digit-suited overrides (crop scale, no flip, no blur) apply to both.
RECIPES: dict[str, list[str]] = {
    "mae": ["model.recipe=mae", "data.num_views=1", "data.augment.preset=mae"],
    "can": ["model.recipe=can", "data.num_views=2", "data.augment.preset=can"],
}
NUM_CLASSES = 10
log = logging.getLogger("bench.learning")


@dataclass(frozen=True)
class Budget:
    steps: int = 60  # optimizer steps per recipe, the same for every recipe (~2.7 epochs of the 1,400 images)
    batch_size: int = 64
    img_size: int = 32  # digits are upscaled from 8 px
    patch_size: int = 8  # 16 patches: 4x fewer tokens than patch 4, so 4x more images in the same CPU minutes
    base_lr: float = 1.5e-3  # x batch / 256 = peak 3.75e-4; measured: larger peaks (2e-3, 4e-3) probe worse
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
        f"optim.global_batch={b.batch_size}", f"optim.base_lr={b.base_lr}",
        f"schedule.total_samples={b.steps * b.batch_size}",
        f"schedule.warmup_samples={max(1, b.steps // 10) * b.batch_size}", f"model.img_size={b.img_size}",
        f"data.img_size={b.img_size}", f"model.patch_size={b.patch_size}", f"data.patch_size={b.patch_size}",
        "checkpoint.resume=false",
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
    model = build_model(ModelConfig(preset="vit_tiny", img_size=budget.img_size, patch_size=budget.patch_size))
    export_encoder(model.state_dict(), out / "encoder.safetensors", preset="vit_tiny")
    return out / "encoder.safetensors"


def probe_config(budget: Budget) -> ProbeConfig:
    return ProbeConfig(optimizer="sgd", base_lr=0.1, epochs=budget.probe_epochs, warmup_epochs=5, batch_size=256)


def knn_top1(train: Features, val: Features) -> float:
    """Weighted kNN (k=20, T=0.07) top-1 % of the val features against the train features."""
    return knn_accuracy(torch.from_numpy(train.feats), torch.from_numpy(train.labels),
                        torch.from_numpy(val.feats), torch.from_numpy(val.labels), NUM_CLASSES)


def probe(encoder: Path, shards: dict[str, str], out: Path, budget: Budget) -> dict:
    """jobs.linear_probe in this process (one rank, no process group), then kNN on the features it cached."""
    cache = out / "features"
    cfg = LinearProbeConfig(
        encoder=str(encoder), train_shards=shards["train"], val_shards=shards["val"], output=str(out / "probe.json"),
        features_cache=str(cache), batch_size=200, workers=1, num_classes=NUM_CLASSES, probe=probe_config(budget),
    )
    result = linear_probe(cfg, Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    feats = {s: Features(np.load(cache / f"{s}_features.npy"), np.load(cache / f"{s}_labels.npy"),
                         np.load(cache / f"{s}_keys.npy")) for s in ("train", "val")}
    return result | {"knn_top1": knn_top1(feats["train"], feats["val"])}


def pixel_features(shards: str, budget: Budget) -> Features:
    """(N, 3 * IMG^2) eval-mode pixels (the same resize + centre crop + normalisation the encoders see)."""
    cfg = eval_data_config(shards, budget.img_size, budget.patch_size, 200, 1, {})
    feats, labels = [], []
    for batch in build_loader(cfg, 0, 1, torch.device("cpu")):
        feats.append(batch["view1"].flatten(1))
        labels.append(batch["labels"].long())
    x, y = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    return Features(x, y, np.arange(len(y)).astype(str))


def raw_pixel_reference(shards: dict[str, str], budget: Budget) -> dict:
    """The same probe and kNN on raw pixels: the headroom a learned encoder has over a trivial one."""
    train, val = pixel_features(shards["train"], budget), pixel_features(shards["val"], budget)
    result = run_probe(train, val, NUM_CLASSES, probe_config(budget), torch.device("cpu"))
    return result | {"knn_top1": knn_top1(train, val)}


def run(out: Path, budget: Budget) -> dict[str, dict]:
    """The whole comparison; returns {row: result} for "raw pixels", "random init", "mae", "can".

    Every result has top1, top5, train_top1, knn_top1 and seconds (pre-training + probing for that row).
    """
    dumps = write_digit_dumps(out / "dump", budget.img_size, budget.seed)
    shards = {split: shard_dump(dumps[split], out / "shards" / split, budget.img_size) for split in dumps}
    t0 = time.monotonic()
    results = {"raw pixels": raw_pixel_reference(shards, budget) | {"seconds": time.monotonic() - t0}}
    rows = {"random init": lambda: random_init_encoder(out / "random_init", budget)}
    rows |= {recipe: (lambda r=recipe: pretrain(r, shards["train"], out / r, budget)) for recipe in RECIPES}
    for name, make_encoder in rows.items():
        t0 = time.monotonic()
        encoder = make_encoder()
        results[name] = probe(encoder, shards, out / name.replace(" ", "_"), budget)
        results[name]["seconds"] = time.monotonic() - t0
    (out / "learning.json").write_text(json.dumps({"budget": asdict(budget), "results": results}, indent=2))
    return results


def format_table(results: dict[str, dict], budget: Budget) -> str:
    b = budget
    lines = [f"linear probe (BN + Linear, {b.probe_epochs} epochs) on 397 held-out digits; vit_tiny/{b.patch_size} at "
             f"{b.img_size} px, {b.steps} steps x {b.batch_size} images per recipe",
             "| encoder | top-1 % | top-5 % | train top-1 % | kNN top-1 % | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['top1']:.1f} | {r['top5']:.1f} | {r['train_top1']:.1f} | {r['knn_top1']:.1f} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Budget()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--base-lr", type=float, default=d.base_lr)
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default="runs/bench_learning")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budget = Budget(a.steps, a.batch_size, a.img_size, a.patch_size, a.base_lr, a.probe_epochs, a.seed)
    t0 = time.monotonic()
    results = run(Path(a.out), budget)
    print(format_table(results, budget))
    print(f"total {time.monotonic() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
