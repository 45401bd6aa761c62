"""Exact-count random masking from per-patch random keys (MAE's random_masking, keys made an input)."""

from __future__ import annotations

import torch


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per image: L - round(L * mask_ratio), so every image masks exactly round(L * mask_ratio)."""
    return num_patches - round(num_patches * mask_ratio)


def random_masking(keys: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys: (N, L) uniform random per patch; the patches with the smallest keys are kept.

    Returns ids_keep (N, K) indices of visible patches, mask (N, L) with 0 = keep, 1 = remove (in the original
    patch order), and ids_restore (N, L), which puts a [visible..., masked...] sequence back in patch order.
    Keys come from the data pipeline, so masks are reproducible from the sample alone (and cost no GPU RNG).
    """
    n, L = keys.shape
    k = num_kept(L, mask_ratio)
    ids_shuffle = torch.argsort(keys, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :k]
    mask = torch.ones(n, L, device=keys.device, dtype=keys.dtype)
    mask[:, :k] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore
