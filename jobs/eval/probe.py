"""The linear probe of CAN_SPEC.md: BatchNorm1d without affine + one Linear layer, trained on cached features.

The parameter-free BatchNorm standardises features whose scale differs wildly between encoders (MAE, appendix A.3:
"BatchNorm without affine transformation"), so one lr fits every encoder; at eval it uses running statistics, so the
head stays a linear map of the features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from jobs.eval.knn import topk_accuracy
from jobs.lars import LARS
from jobs.eval.schedule import warmup_cosine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeConfig:
    optimizer: Literal["sgd", "lars"] = "sgd"
    base_lr: float = 0.1  # lr = base_lr * batch / 256 (MAE's rule; MAE's LARS probe uses 0.1 at batch 16384)
    momentum: float = 0.9
    weight_decay: float = 0.0  # MAE probes without weight decay
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 1024  # 0 = full batch
    seed: int = 0


def make_probe(dim: int, num_classes: int) -> nn.Sequential:
    """(N, D) features -> (N, C) logits. The Linear starts at MAE's trunc-normal std 0.01, bias 0.

    momentum=None makes the running statistics a cumulative average over all training batches: on fixed, cached
    features that converges to the data statistics even for a few full-batch steps, where the default EMA (0.1)
    would still be biased towards its (0, 1) start.
    """
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
    head = nn.Sequential(norm, nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def effective_lr(cfg: ProbeConfig, num_samples: int) -> float:
    batch = cfg.batch_size or num_samples
    return cfg.base_lr * min(batch, num_samples) / 256


def train_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> nn.Sequential:
    """feats: (N, D) float, labels: (N,) int in [0, C) -> the trained probe (eval mode), on feats' device.

    Minibatches are reshuffled every epoch with a generator seeded by cfg.seed, so a probe is reproducible.
    """
    n, dim = feats.shape
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = make_probe(dim, num_classes).to(feats.device)
    opt_cls = {"sgd": torch.optim.SGD, "lars": LARS}[cfg.optimizer]
    lr = effective_lr(cfg, n)
    opt = opt_cls(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    batch = min(cfg.batch_size or n, n)
    steps_per_epoch = n // batch  # drop the ragged last batch: BatchNorm statistics of a tiny batch are noise
    total = cfg.epochs * steps_per_epoch
    step = 0
    head.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(feats.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch : (i + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = warmup_cosine(step, total, cfg.warmup_epochs * steps_per_epoch, lr)
            loss = F.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if epoch == cfg.epochs - 1 or (epoch + 1) % max(1, cfg.epochs // 5) == 0:
            log.info("probe epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, loss.item())
    return head.eval()


@torch.no_grad()
def evaluate_probe(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent of the probe on (N, D) features."""
    head.eval()
    return topk_accuracy(head(feats), labels, ks=(1, 5))
