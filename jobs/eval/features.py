"""Frozen-encoder features: extract per rank, gather to rank 0 (each sample once), cache as .npy.

Probes then train on the cached (N, D) matrix for many epochs without touching the encoder again, the usual
practice for linear evaluation of large encoders (the features cost one forward pass over the data).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Features:
    """feats: (N, D) float32; labels: (N,) int64 (-1 = unlabelled); keys: (N,) str, the shard sample keys."""

    feats: np.ndarray
    labels: np.ndarray
    keys: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """tokens: (B, 1 + L, D), cls first -> (B, D): "avg" = mean of the L patch tokens (CAN/MAE probing), "token" = cls.

    A ViT's tokens only: a ResNet's feature map (B, C, h, w) is refused (pool it with pooled_features)."""
    if tokens.ndim != 3:
        raise ValueError(f"pool_tokens takes ViT tokens (B, 1 + L, D), got shape {tuple(tokens.shape)}; "
                         "pool other backbones with pooled_features(encoder, x)")
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    if pool == "token":
        return tokens[:, 0]
    raise ValueError(f"pool must be 'avg' or 'token', got {pool!r}")


def pooled_features(encoder: nn.Module, x: torch.Tensor, pool: str | None = None) -> torch.Tensor:
    """x: (B, 3, H, W) -> the (B, D) features a probe sees.

    pool None: the encoder's own `forward_head(forward_features(x), pre_logits=True)`, which every backbone has (the
    ViT pools as its global_pool says; the ResNet averages its (B, C, h, w) map to C = num_features). "avg" /
    "token": pool a ViT's tokens explicitly (pool_tokens).
    """
    feats = encoder.forward_features(x)
    if pool is None:
        return encoder.forward_head(feats, pre_logits=True)
    return pool_tokens(feats, pool)


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[dict[str, Any]], pool: str | None = None) -> Features:
    """Pooled features (pooled_features: pool None = the encoder's forward_head) of eval batches
    {"view1": (B, 3, H, W), "labels": (B,), "keys": [B]}.

    Returns this rank's features only (see gather_features). The encoder is put in eval mode (no drop path, BatchNorm
    running statistics) and left there; bf16 autocast on CUDA halves the cost and does not move linear-probe
    accuracy measurably.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, labels, keys = [], [], []
    for batch in batches:
        x = batch["view1"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pooled = pooled_features(encoder, x, pool)
        feats.append(pooled.float().cpu())
        labels.append(batch["labels"].long().cpu())
        keys.extend(batch["keys"])
    dim = getattr(encoder, "num_features", 0)
    return Features(
        feats=torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32),
        labels=torch.cat(labels).numpy() if labels else np.zeros((0,), np.int64),
        keys=np.asarray(keys, dtype=str),
    )


def dedupe_sorted(f: Features) -> Features:
    """Keep each key once, in key order: the result does not depend on how samples were split over ranks
    (and absorbs any samples a loader repeats to give every rank the same number of batches)."""
    keys, first = np.unique(f.keys, return_index=True)
    return Features(feats=f.feats[first], labels=f.labels[first], keys=keys)


def gather_features(local: Features, dst: int = 0) -> Features | None:
    """Collect every rank's features on rank `dst` (None elsewhere), each sample exactly once, sorted by key.

    Without an initialised process group this just dedupes and sorts. Collective: every rank must call it.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dedupe_sorted(local)
    parts: list[Features] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None  # type: ignore[list-item]
    # Objects, not tensors: ranks hold different sample counts, and keys are strings.
    dist.gather_object(local, parts, dst=dst)
    if parts is None:
        return None
    merged = Features(
        feats=np.concatenate([p.feats for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        keys=np.concatenate([p.keys for p in parts]),
    )
    return dedupe_sorted(merged)


# ---- cache --------------------------------------------------------------------------------------------------------


def _paths(cache_dir: str | Path, split: str) -> dict[str, Path]:
    d = Path(cache_dir)
    return {name: d / f"{split}_{name}.npy" for name in ("features", "labels", "keys")} | {"meta": d / f"{split}_meta.json"}


def save_features(cache_dir: str | Path, split: str, f: Features, meta: dict[str, Any]) -> None:
    """Write {split}_features/labels/keys.npy, then {split}_meta.json last: a cache with its meta file is complete."""
    paths = _paths(cache_dir, split)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    paths["meta"].unlink(missing_ok=True)
    for name, arr in (("features", f.feats), ("labels", f.labels), ("keys", f.keys)):
        tmp = paths[name].with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, paths[name])
    tmp = paths["meta"].with_suffix(".tmp")
    tmp.write_text(json.dumps(meta | {"num_samples": len(f), "dim": int(f.feats.shape[1])}, indent=1, sort_keys=True))
    os.replace(tmp, paths["meta"])


def load_features(cache_dir: str | Path, split: str, meta: dict[str, Any]) -> Features | None:
    """The cached features of `split` if present and made with the same `meta` (encoder, shards, pooling ...), else None."""
    paths = _paths(cache_dir, split)
    if not paths["meta"].exists():
        return None
    saved = json.loads(paths["meta"].read_text())
    if any(saved.get(k) != json.loads(json.dumps(v)) for k, v in meta.items()):
        return None
    return Features(
        feats=np.load(paths["features"]), labels=np.load(paths["labels"]), keys=np.load(paths["keys"])
    )
