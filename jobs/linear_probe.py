"""Linear probe of a frozen encoder (CAN_SPEC.md, evaluation protocol): features once, then a BN + Linear head.

    python -m jobs.linear_probe --encoder runs/can_vit_large --train-shards 's3://in1k/train/shard-{000000..001023}.tar' \
        --val-shards 's3://in1k/val/shard-{000000..000063}.tar' --features-cache runs/can_vit_large/probe_cache
    torchrun --nproc_per_node 8 -m jobs.linear_probe ...      # extraction on 8 ranks; the probe trains on rank 0
    deepspeed --num_gpus 8 jobs/linear_probe.py ...          # same

--encoder: a run directory (latest complete checkpoint), a checkpoint, or an exported encoder.safetensors; a ViT or
a ResNet (MSCN runs: its 2048-d globally averaged features; --pool avg only).
Shards carry `KEY.cls` labels (tools/shard.py). Every rank streams its share through the pipeline's eval mode
(resize, centre crop, no masking) with the preprocessing the encoder was trained with: MSCN's high-pass, mean / std
and resize ratio, read from the export's JSON (eval_preprocessing) or the run's resolved.yaml (data.augment), the
defaults when neither records it. Rank 0 gathers the features, each sample exactly once, caches them as .npy, trains
the probe and writes probe.json. With a matching cache the encoder is not even loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from jobs.eval.encoder_source import EncoderSource, load_source, resolve_source
from jobs.eval.features import Features, extract_features, gather_features, load_features, save_features
from jobs.eval.probe import ProbeConfig, effective_lr, evaluate_probe, train_probe
from jobs.launch import Dist, init_distributed
from pipeline.config import AugmentConfig, DataConfig, eval_augment, eval_preprocessing
from pipeline.loader import build_loader

log = logging.getLogger("jobs.linear_probe")


@dataclass(frozen=True)
class LinearProbeConfig:
    encoder: str  # run dir, checkpoint, or exported .safetensors
    train_shards: str
    val_shards: str
    output: str = "probe.json"
    features_cache: str | None = None  # directory of {split}_{features,labels,keys}.npy + meta; reused when matching
    pool: str = "avg"  # "avg" = mean of patch tokens (CAN/MAE protocol) / a ResNet's global average, "token" = cls
    batch_size: int = 128  # images per rank per forward pass during extraction
    workers: int = 2  # shard readers per rank
    num_classes: int | None = None  # None = 1 + the largest label seen
    img_size: int | None = None  # a ResNet's input size if its export / run records none (a ViT's is fixed)
    storage_options: dict = field(default_factory=dict)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def eval_data_config(shards: str, img_size: int, patch_size: int, batch_size: int, workers: int,
                     storage_options: dict, augment: AugmentConfig | None = None) -> DataConfig:
    """Eval-mode loader settings: resize + centre crop (AugmentConfig.eval_resize_ratio), one view, one pass."""
    return DataConfig(shards=shards, mode="eval", batch_size=batch_size, img_size=img_size, patch_size=patch_size,
                      num_views=1, workers=workers, shuffle_buffer=0, storage_options=storage_options,
                      augment=augment or AugmentConfig())


def cache_meta(encoder_fingerprint: dict, shards: str, pool: str, img_size: int, augment: AugmentConfig) -> dict:
    """What a feature cache must have been made with to be reused: the encoder's weights, the shards, the pooling
    and everything the eval pipeline does to the images.

    The preprocessing enters as "preprocessing" (pipeline.config.eval_preprocessing) only when it is not the
    default one, so caches written before it was recorded - all made with the defaults - stay valid; an MSCN
    encoder's cache without the high-pass in its key is not.
    """
    meta = {"encoder": encoder_fingerprint, "shards": shards, "pool": pool, "img_size": img_size,
            "resize_ratio": augment.eval_resize_ratio}
    prep = eval_preprocessing(augment)
    if prep != eval_preprocessing(AugmentConfig()):
        meta["preprocessing"] = prep
    return meta


def split_features(split: str, data_cfg: DataConfig, get_encoder: Callable[[], nn.Module], world: Dist,
                   cache_dir: str | None, meta: dict) -> Features | None:
    """This split's features on rank 0 (None elsewhere): from the cache when it matches, else extracted on all ranks.

    Collective: every rank calls it. Rank 0 decides whether the cache is usable and tells the others, so they
    either all extract or all skip.
    """
    cached = load_features(cache_dir, split, meta) if (cache_dir and world.is_main) else None
    hit = [cached is not None]
    if world.world_size > 1:
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        if world.is_main:
            log.info("%s: reusing %d cached features from %s", split, len(cached), cache_dir)
        return cached
    loader = build_loader(data_cfg, world.rank, world.world_size, world.device)
    local = extract_features(get_encoder(), loader)  # pooled as the encoder pools (load_source set the ViT's)
    loader.close()
    feats = gather_features(local)
    if world.is_main:
        log.info("%s: extracted %d features of width %d", split, len(feats), feats.feats.shape[1])
        if cache_dir:
            save_features(cache_dir, split, feats, meta)
    return feats


def labelled(f: Features, split: str) -> Features:
    """Drop samples without a label (cls -1): they cannot train or score a probe."""
    keep = f.labels >= 0
    if not keep.all():
        log.warning("%s: %d of %d samples have no label and are left out", split, (~keep).sum(), len(f))
    return Features(f.feats[keep], f.labels[keep], f.keys[keep])


def run_probe(train: Features, val: Features, num_classes: int, cfg: ProbeConfig, device: torch.device) -> dict:
    """Train the probe on `train` features, score top-1/top-5 (percent) on `val` and on `train`."""
    xt, yt = torch.from_numpy(train.feats).to(device), torch.from_numpy(train.labels).to(device)
    xv, yv = torch.from_numpy(val.feats).to(device), torch.from_numpy(val.labels).to(device)
    head = train_probe(xt, yt, num_classes, cfg)
    scores = evaluate_probe(head, xv, yv)
    return {"top1": scores["top1"], "top5": scores["top5"], "train_top1": evaluate_probe(head, xt, yt)["top1"],
            "num_train": len(train), "num_val": len(val), "num_classes": num_classes,
            "lr": effective_lr(cfg, len(train))}


def linear_probe(cfg: LinearProbeConfig, world: Dist) -> dict | None:
    """The whole job; returns the result dict on rank 0 (None elsewhere) and writes cfg.output there."""
    source = resolve_source(cfg.encoder)
    encoder: list[nn.Module] = []

    def get_encoder() -> nn.Module:  # loaded at most once, and only when some split misses the cache
        if not encoder:
            encoder.append(load_source(source, cfg.pool).to(world.device))
        return encoder[0]

    shape = input_shape(source, get_encoder, cfg.img_size)
    recorded, origin = source.eval_preprocessing()
    augment = eval_augment(recorded)
    prep = eval_preprocessing(augment)
    if world.is_main:
        log.info("eval preprocessing from %s: %s", origin, prep)
    results = {}
    for split, shards in (("train", cfg.train_shards), ("val", cfg.val_shards)):
        data_cfg = eval_data_config(shards, shape[0], shape[1], cfg.batch_size, cfg.workers, cfg.storage_options,
                                    augment)
        meta = cache_meta(source.fingerprint(), shards, cfg.pool, shape[0], augment)
        results[split] = split_features(split, data_cfg, get_encoder, world, cfg.features_cache, meta)
    if not world.is_main:
        return None
    train, val = labelled(results["train"], "train"), labelled(results["val"], "val")
    num_classes = cfg.num_classes or int(max(train.labels.max(), val.labels.max())) + 1
    out = run_probe(train, val, num_classes, cfg.probe, world.device)
    out |= {"encoder": str(source.path), "pool": cfg.pool, "img_size": shape[0], "eval_preprocessing": prep,
            "probe": asdict(cfg.probe)}
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(out, indent=2) + "\n")
    log.info("linear probe: top-1 %.2f %%, top-5 %.2f %% on %d validation images (train top-1 %.2f %%) -> %s",
             out["top1"], out["top5"], out["num_val"], out["train_top1"], cfg.output)
    return out


def input_shape(source: EncoderSource, get_encoder: Callable[[], nn.Module], img_size: int | None) -> tuple[int, int]:
    """(img_size, patch_size) for the eval loader.

    A ViT's come from its export's JSON, else its weights (the position embedding fixes them). A ResNet takes any
    size: `img_size` when given, else the one its export or run records; it has no patches, and the eval loader
    does not use patch_size (no mask keys), so it gets img_size (one "patch").
    """
    meta = source.export_meta()
    if meta:  # an export: no need to load the weights
        vit_shape = (meta["img_size"], meta["patch_size"]) if meta.get("arch", "vit") == "vit" else None
    else:
        pe = getattr(get_encoder(), "patch_embed", None)
        vit_shape = (pe.img_size, pe.patch_size) if pe is not None else None
    if vit_shape is not None:
        if img_size not in (None, vit_shape[0]):
            raise ValueError(f"{source.path}: a ViT's input size is fixed at {vit_shape[0]} by its position embedding, "
                             f"not {img_size}")
        return vit_shape
    size = img_size or source.img_size()
    if size is None:
        raise ValueError(f"{source.path}: the encoder's input size is recorded nowhere (no export JSON img_size, no "
                         "run resolved.yaml): pass --img-size")
    return size, size


def parse_args(argv: list[str] | None) -> LinearProbeConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True)
    p.add_argument("--train-shards", required=True)
    p.add_argument("--val-shards", required=True)
    p.add_argument("--output", default="probe.json")
    p.add_argument("--features-cache", default=None)
    p.add_argument("--pool", choices=("avg", "token"), default="avg")
    p.add_argument("--batch-size", type=int, default=128, help="extraction images per rank per step")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None,
                   help="a ResNet's input size when its export / run does not record it (a ViT's is fixed)")
    d = ProbeConfig()
    p.add_argument("--optimizer", choices=("sgd", "lars"), default=d.optimizer)
    p.add_argument("--base-lr", type=float, default=d.base_lr, help="lr = base_lr * probe batch / 256")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    p.add_argument("--probe-batch-size", type=int, default=d.batch_size, help="0 = full batch")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    probe = ProbeConfig(optimizer=a.optimizer, base_lr=a.base_lr, weight_decay=a.weight_decay, epochs=a.epochs,
                        warmup_epochs=a.warmup_epochs, batch_size=a.probe_batch_size, seed=a.seed)
    return LinearProbeConfig(encoder=a.encoder, train_shards=a.train_shards, val_shards=a.val_shards,
                             output=a.output, features_cache=a.features_cache, pool=a.pool, batch_size=a.batch_size,
                             workers=a.workers, num_classes=a.num_classes, img_size=a.img_size, probe=probe)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    world = init_distributed()
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING,
                        format=f"%(asctime)s [rank {world.rank}] %(name)s: %(message)s", force=True)
    linear_probe(cfg, world)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
