"""All-gather for negatives (and labels) from the global batch; SyncBatchNorm for data-parallel BatchNorm models."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns to each rank the sum, over every rank's loss, of the gradient of its rows.

    torch.distributed.nn.functional.all_gather does the same but is deprecated in torch 2.13. The backward is an
    all-reduce plus a slice rather than a reduce-scatter because gloo (CPU runs) has no reduce-scatter; the tensor is
    a batch of projector outputs (a few MB at batch 4096), so the difference does not show.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((_world() * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x)
        ctx.rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: (n, ...) this rank's rows -> ((world * n, ...) every rank's rows in rank order, offset of this rank's rows).

    Backward sums the gradients that all ranks' losses send to each part back onto its owner, so with gradients
    averaged over ranks (DDP / DeepSpeed) the result equals one process on the whole batch. Every rank must hold the
    same n. Without an initialised process group (or with one rank) this is the identity.
    """
    if _world() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """x: (n, ...) this rank's rows (e.g. labels) -> (world * n, ...) in rank order, same order as gather_with_grad."""
    if _world() == 1:
        return x
    out = x.new_empty((_world() * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous())
    return out


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
