"""All-gather for negatives (and labels) from the global batch; SyncBatchNorm for data-parallel BatchNorm models."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: (n, ...) this rank's rows -> ((world * n, ...) every rank's rows in rank order, offset of this rank's rows).

    Backward sums the gradients that all ranks' losses send to each part back onto its owner (reduce-scatter), so
    with gradients averaged over ranks (DDP / DeepSpeed) the result equals one process on the whole batch. Every
    rank must hold the same n. Without an initialised process group (or with one rank) this is the identity.
    """
    if _world() == 1:
        return x, 0
    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (n, ...) this rank's rows (e.g. labels) -> (world * n, ...) in rank order, same order as gather_with_grad."""
    if _world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when data parallel on GPUs; else the model unchanged.

    SimCLR and BYOL normalise with statistics of the global batch: per-rank statistics over a few dozen images are
    noisy, and let the contrastive loss cheat through batch statistics (SimCLR, section 3). Call it once, after
    build_model and before wrapping in DDP / DeepSpeed. PyTorch's SyncBatchNorm runs on GPUs only, so CPU
    (gloo) runs keep per-rank BatchNorm.
    """
    if _world() == 1 or device.type != "cuda":
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
