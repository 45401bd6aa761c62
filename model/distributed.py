"""All-gather with gradients, for InfoNCE negatives from the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x: (n, ...) this rank's rows -> ((world * n, ...) every rank's rows in rank order, offset of this rank's rows).

    Backward sums the gradients that all ranks' losses send to each part back onto its owner (reduce-scatter), so
    with gradients averaged over ranks (DDP / DeepSpeed) the result equals one process on the whole batch. Every
    rank must hold the same n. Without an initialised process group (or with one rank) this is the identity.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = dist_fn.all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]
