"""Proof that pre-training learns: linear-probe accuracy of one encoder at random init and after each recipe.

    python -m bench.learning [--recipes mae can mscn supcon] [--steps N] [--batch-size B] [--parallel P]
                             [--patch-size P] [--base-lr LR] [--out runs/bench_learning]

Data: sklearn's load_digits (1,797 real 8 x 8 scans of handwritten digits, 10 classes), upscaled to 32 px RGB,
split stratified with a fixed seed into 1,400 training and 397 validation images, written as labelled shards by
tools/shard.py (--labels-from-folders). Each recipe pre-trains vit_tiny/8 on the training shards through the real
trainer (jobs/pretrain.py, one process per recipe, jobs/configs/digits_cpu.yaml) for the same number of steps, P
recipes side by side (THREADS below gives each one's threads); then jobs.linear_probe extracts frozen mean-pooled
features and trains the BN + Linear probe (same probe budget for every row). Beside the probe: weighted kNN (k=20)
on the same features, and a raw-pixel reference row (the probe and kNN on the eval-mode pixels themselves). Every
row is probed on the same eval images (digits_cpu.yaml: whole image, no centre crop). Prints one table, writes
OUT/learning.json. The can row uses CAN_SPEC.md's objective unchanged (weights 0.03 / 0.67 / 0.30, mask 0.5,
sigma_max 0.05).

What the default budget rests on (2 CPU cores, 2026-11-22):
- Real trainer, 1,400 steps x 32 (32 epochs), one recipe at a time with 2 threads, with
  the ImageNet eval crop (resize 32 / 0.875, centre crop): random init 91.7, mae 96.0, can 96.7 (+5.0); mae 317 s,
  can 510 s with 2 threads on a quiet machine. The same encoders re-probed on whole images (eval_resize_ratio 1.0,
  now digits_cpu.yaml's): random init 90.4, mae 95.2, can 97.0 (+6.6). A 32 px digit fills its frame, so the centre
  crop cuts strokes; it also happened to favour the random features.
- Shorter schedules do not get there. An in-process loop (the same CANModel, AdamW betas (0.9, 0.95), wd 0.05,
  warm-up 10 % + cosine, clip 1, torch crops instead of DALI, whole-image eval, the same probe; random init 90.2),
  can's probe top-1 at the END of each schedule, batch 32, crop 0.3-1:
      | schedule   | 16 epochs | 20 epochs | 24 epochs | 32 epochs |
      | can        | 93.5 (*)  | 92.4      | 94.5      | 97.7      |
  (*) contrastive weight 1.0; with CAN_SPEC's 0.03 the 32-epoch run was 97.7 and with 1.0 97.5, so the spec's
  weights stay. Along the 32-epoch run: 88.7 / 92.7 / 93.5 / 94.7 / 96.5 / 97.0 / 97.5 / 97.7 at epochs 4..32:
  the gain comes while the lr is still high, so a shorter cosine ends before it. Twice the peak lr (16 epochs) probes
  worse at every epoch (87.4 at 8); batch 64 at equal epochs (half the steps) and crop 0.5-1 learn more slowly
  (can, 16 epochs, batch 32: 92.9 with crop 0.5-1 vs 93.5 with 0.3-1; SimCLR after 12 epochs: 94.0 at batch 32,
  92.4 at batch 64); rotations of +-15 degrees did not help (92.4 vs 93.5).
- mscn and supcon rows at the default budget (--recipes mscn supcon --parallel 1, 2 threads each, 1,459 s in all):
  probe top-1 / kNN: random init 90.4 / 66.2; random init on high-passed images (sigma 1, mscn's eval) 81.1 / 42.6;
  mscn 83.1 / 70.5 (pre-training 741 s); supcon 97.7 / 97.5. The high-pass costs 32 px digits 9 probe points before
  any training; MSCN gains 2 probe and 28 kNN points over that baseline. At a quarter of the budget (--recipes can
  mscn supcon --steps 350, 458 s): random init 90.4, can 90.2, mscn 81.4, supcon 90.7 (kNN 66.2 / 71.5 / 54.2 / 76.6).
- The first budget (60 steps x 64, ImageNet crop, crop 0.5-1) measured random 91.7, mae 89.9, can 91.2: two epochs
  of a reconstruction-dominated objective make mean-pooled features less linearly separable before they make them
  more.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.config import load_config
from jobs.eval.features import Features
from jobs.eval.knn import knn_accuracy
from jobs.eval.probe import ProbeConfig
from jobs.launch import Dist
from jobs.linear_probe import LinearProbeConfig, eval_data_config, linear_probe, run_probe
from model.can import build_model
from model.config import ModelConfig
from model.export import export_encoder
from model.presets import VIT_PRESETS
from pipeline.config import AugmentConfig, eval_preprocessing
from pipeline.loader import build_loader
from tools import shard

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "jobs" / "configs" / "digits_cpu.yaml"
# Per recipe: the trainer overrides that make it, on top of digits_cpu.yaml (whose digit-suited view overrides apply to
# every row). The augment preset is the recipe's (CAN_SPEC.md: mae sees one crop-only view, no jitter).
RECIPES: dict[str, list[str]] = {
    "mae": ["model.recipe=mae", "data.num_views=1", "data.augment.preset=mae"],
    "can": ["model.recipe=can", "data.num_views=2", "data.augment.preset=can"],
    # MSCN (SimCLR branch) on the same ViT: pixel-space masks of a ConvNet recipe, so the row says what they do to a
    # ViT encoder. Scaled to 32 px digits: a grid cell of 8 px (the paper's 32 px of 224 would mask the whole
    # image), high-pass sigma 1 px (the paper's 5 px of 224, scaled: 0.7).
    "mscn": ["model.recipe=mscn_simclr", "data.num_views=2", "data.augment.preset=mscn_simclr",
             "data.augment.mscn.grid_cell=8", "data.augment.mscn.highpass_sigma=1.0"],
    # Supervised contrastive with the training split's labels: not self-supervised, a reference for how far the
    # probe can go with this encoder and budget when the labels are used.
    "supcon": ["model.recipe=supcon", "data.num_views=2", "data.augment.preset=can"],
}
NUM_CLASSES = 10
log = logging.getLogger("bench.learning")


@dataclass(frozen=True)
class Budget:
    steps: int = 1400  # optimizer steps per recipe, the same for every recipe: 32 epochs of the 1,400 images
    batch_size: int = 32  # measured: at equal epochs, 32 learns faster than 64 (twice the steps)
    img_size: int = 32  # digits are upscaled from 8 px
    patch_size: int = 8  # 16 patches: 4x fewer tokens than patch 4, so 4x more images in the same CPU minutes
    base_lr: float = 1.5e-3  # x batch / 256 = peak 1.9e-4; measured: twice that probes worse at every epoch
    probe_epochs: int = 100
    seed: int = 0
    preset: str = "vit_tiny"  # the encoder (model.presets); make test's learning test runs vit_micro


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


def pretrain_command(recipe: str, shards: str, out: Path, budget: Budget) -> list[str]:
    """One process of jobs/pretrain.py for `recipe`; it exports OUT/encoder.safetensors at the end."""
    b = budget
    sets = RECIPES[recipe] + [
        f"data.shards={shards}", f"output_dir={out}", f"seed={b.seed}", f"data.batch_size={b.batch_size}",
        f"optim.global_batch={b.batch_size}", f"optim.base_lr={b.base_lr}",
        f"schedule.total_samples={b.steps * b.batch_size}",
        f"schedule.warmup_samples={max(1, b.steps // 10) * b.batch_size}", f"model.img_size={b.img_size}",
        f"data.img_size={b.img_size}", f"model.patch_size={b.patch_size}", f"data.patch_size={b.patch_size}",
        f"model.preset={b.preset}",
        "checkpoint.resume=false",
    ]
    cmd = [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


# OMP threads per pre-training process (capped at the machine's cores), with OMP_WAIT_POLICY=PASSIVE: spinning
# threads starve each other once three share two cores (measured: can at 26 images/s with 2 spinning threads beside
# mae with 1). Passive, 300 steps of 32 on 2 cores: can (2 threads) 50-60 images/s beside mae (1 thread) 100-140;
# one thread each: 57 and 100; can alone with 2 threads: 97, so it speeds up once mae is done.
# mscn and supcon were measured one at a time (--parallel 1); the default pairing of all four rows puts them side by
# side with 4 threads on 2 cores, which is unmeasured: --parallel 1 reproduces the README's figures.
THREADS = {"mae": 1, "can": 2, "mscn": 2, "supcon": 2}


def pretrain_all(recipes: tuple[str, ...], shards: str, out: Path, budget: Budget,
                 parallel: int) -> dict[str, tuple[Path, float]]:
    """Pre-train every recipe, `parallel` processes at a time (THREADS each).
    Returns {recipe: (exported encoder, wall seconds of its round)}."""
    cores = os.cpu_count() or 1
    encoders, pending = {}, list(recipes)
    while pending:
        batch, pending = pending[:parallel], pending[parallel:]
        t0 = time.monotonic()
        procs = {}
        for r in batch:
            threads = min(cores, THREADS[r])
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "OMP_WAIT_POLICY": "PASSIVE"}
            (out / r).mkdir(parents=True, exist_ok=True)
            log_file = open(out / r / "pretrain.log", "w")
            procs[r] = (subprocess.Popen(pretrain_command(r, shards, out / r, budget), cwd=REPO, env=env,
                                         stdout=log_file, stderr=subprocess.STDOUT), log_file)
        running = dict(procs)
        while running:  # poll, so each recipe's time is its own even when a later one finishes first
            time.sleep(1.0)
            for r, (proc, log_file) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[r]
                log_file.close()
                if code != 0:
                    for other, _ in running.values():
                        other.kill()
                    tail = (out / r / "pretrain.log").read_text()[-4000:]
                    raise RuntimeError(f"pretraining {r} failed (exit {code}), {out / r / 'pretrain.log'}:\n{tail}")
                seconds = time.monotonic() - t0
                log.info("%s: %d steps of %d images in %.0f s (%d side by side)", r, budget.steps, budget.batch_size,
                         seconds, len(batch))
                encoders[r] = (out / r / "encoder.safetensors", seconds)
    return encoders


def digits_augment(recipe: str | None = None) -> AugmentConfig:
    """digits_cpu.yaml's views, with `recipe`'s overrides if given; their eval part (resize ratio 1.0, and for mscn
    the high-pass, applied at evaluation too) is what the rows are probed with."""
    return load_config(CONFIG, RECIPES[recipe] if recipe else []).data.augment


def random_init_encoder(out: Path, budget: Budget, augment: AugmentConfig | None = None) -> Path:
    """The encoder exactly as the trainer initialises it (seeded build_model), exported like a trained one (with the
    same eval preprocessing as the trainer records for `augment`, default digits_cpu.yaml's, so the probe sees the
    same images as the rows it is compared with)."""
    torch.manual_seed(budget.seed)
    model = build_model(ModelConfig(preset=budget.preset, img_size=budget.img_size, patch_size=budget.patch_size))
    export_encoder(model.state_dict(), out / "encoder.safetensors", preset=budget.preset,
                   eval_preprocessing=eval_preprocessing(augment or digits_augment()))
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
    cfg = eval_data_config(shards, budget.img_size, budget.patch_size, 200, 1, {}, digits_augment())
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


def run(out: Path, budget: Budget, recipes: tuple[str, ...] = tuple(RECIPES), parallel: int = 2) -> dict[str, dict]:
    """The whole comparison; returns {row: result} for "raw pixels", "random init" (also "random init, high-passed"
    when mscn is run) and each of `recipes`.

    Every result has top1, top5, train_top1, knn_top1 and seconds (probing that row, plus, for a pre-trained row,
    its pre-training wall time: rows pre-trained side by side share the cores).
    """
    dumps = write_digit_dumps(out / "dump", budget.img_size, budget.seed)
    shards = {split: shard_dump(dumps[split], out / "shards" / split, budget.img_size) for split in dumps}
    t0 = time.monotonic()
    results = {"raw pixels": raw_pixel_reference(shards, budget) | {"seconds": time.monotonic() - t0}}
    rows = {"random init": (random_init_encoder(out / "random_init", budget), 0.0)}
    if "mscn" in recipes:  # mscn is probed on high-passed images; its baseline is random init on the same images
        highpassed = random_init_encoder(out / "random_init_highpass", budget, digits_augment("mscn"))
        rows["random init, high-passed"] = (highpassed, 0.0)
    rows |= pretrain_all(recipes, shards["train"], out, budget, parallel)
    for name, (encoder, pretrain_s) in rows.items():
        t0 = time.monotonic()
        results[name] = probe(encoder, shards, out / name.replace(" ", "_"), budget)
        results[name]["seconds"] = time.monotonic() - t0 + pretrain_s
    (out / "learning.json").write_text(json.dumps({"budget": asdict(budget), "recipes": list(recipes),
                                                   "results": results}, indent=2))
    return results


def format_table(results: dict[str, dict], budget: Budget) -> str:
    b = budget
    lines = [f"linear probe (BN + Linear, {b.probe_epochs} epochs) on 397 held-out digits; {b.preset}/{b.patch_size} at "
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
    p.add_argument("--preset", default=d.preset, choices=sorted(VIT_PRESETS), help="the encoder's size")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=list(RECIPES),
                   help="pre-training rows (default: all); random init and raw pixels are always measured")
    p.add_argument("--parallel", type=int, default=2, help="pre-training processes side by side (cores shared)")
    p.add_argument("--out", default="runs/bench_learning")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    budget = Budget(a.steps, a.batch_size, a.img_size, a.patch_size, a.base_lr, a.probe_epochs, a.seed, a.preset)
    t0 = time.monotonic()
    results = run(Path(a.out), budget, tuple(a.recipes), a.parallel)
    print(format_table(results, budget))
    print(f"total {time.monotonic() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
