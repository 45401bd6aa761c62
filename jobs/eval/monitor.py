"""kNN monitor for the trainer: top-1 of a weighted kNN classifier on a small labelled set, every N steps.

    monitor = KNNMonitor.from_data(memory_cfg, query_cfg, num_classes=10)   # once, at start-up
    metrics |= monitor(model.encoder)                                       # every N steps -> {"knn_top1": ...}

The images are decoded once and kept as tensors, so a call costs one frozen forward pass over the set.
It runs no collectives: call it on rank 0 only, or on every rank (each gets the same number).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jobs.eval.features import pooled_features
from jobs.eval.knn import knn_accuracy
from pipeline.config import DataConfig
from pipeline.loader import build_loader


@dataclass
class LabelledImages:
    """images: (N, 3, H, W) float, normalised as the loader's eval views; labels: (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor


def load_labelled_images(cfg: DataConfig, max_samples: int | None = None) -> LabelledImages:
    """Decode a (small) labelled shard set once through the pipeline's eval mode, on this process alone."""
    cfg = cfg.with_(mode="eval", num_views=1)
    images, labels = [], []
    for batch in build_loader(cfg, rank=0, world_size=1, device=torch.device("cpu")):
        images.append(batch["view1"].cpu())
        labels.append(batch["labels"].long().cpu())
        if max_samples is not None and sum(len(x) for x in labels) >= max_samples:
            break
    images_t, labels_t = torch.cat(images)[:max_samples], torch.cat(labels)[:max_samples]
    if (labels_t < 0).any():
        raise ValueError(f"{cfg.shards}: samples without a cls label cannot serve the kNN monitor")
    return LabelledImages(images_t, labels_t)


class KNNMonitor:
    """Weighted kNN top-1 (k, temperature as DINO) of an encoder on a fixed memory set and query set."""

    def __init__(
        self,
        memory: LabelledImages,
        queries: LabelledImages,
        num_classes: int,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 256,
        pool: str | None = None,
    ):
        """pool: None = the encoder's own forward_head(pre_logits=True), which every backbone has (the ViT pools as
        its global_pool says, the ResNet averages its feature map); "avg" / "token" pool a ViT's tokens explicitly
        (jobs.eval.features.pooled_features)."""
        self.memory, self.queries = memory, queries
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.batch_size, self.pool = batch_size, pool

    @classmethod
    def from_data(cls, memory_cfg: DataConfig, query_cfg: DataConfig, num_classes: int, **kwargs) -> "KNNMonitor":
        return cls(load_labelled_images(memory_cfg), load_labelled_images(query_cfg), num_classes, **kwargs)

    @torch.no_grad()
    def _embed(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) -> pooled features (N, D), in batches, on the encoder's device."""
        device = next(encoder.parameters()).device
        out = []
        for x in images.split(self.batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(pooled_features(encoder, x.to(device), self.pool).float())
        return torch.cat(out)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """encoder: a VisionTransformer or a ResNet (any backbone with the timm interface when pool is None). Its
        train/eval mode is restored afterwards."""
        was_training = encoder.training
        encoder.eval()
        try:
            bank = self._embed(encoder, self.memory.images)
            query = self._embed(encoder, self.queries.images)
        finally:
            encoder.train(was_training)
        top1 = knn_accuracy(
            bank, self.memory.labels.to(bank.device), query, self.queries.labels.to(bank.device),
            num_classes=self.num_classes, k=self.k, temperature=self.temperature,
        )
        return {"knn_top1": top1}
