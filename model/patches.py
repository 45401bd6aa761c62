"""Patchify / unpatchify with MAE's conventions (row-major patches, pixels (p, p, C) inside a patch)."""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """imgs: (N, C, H, W) -> (N, L, p*p*C), L = (H/p) * (W/p), patch order matches PatchEmbed's tokens."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a multiple of patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """x: (N, L, p*p*C) with L a square -> imgs (N, C, H, W); the inverse of patchify."""
    n, L, _ = x.shape
    p = patch_size
    g = int(round(L**0.5))
    if g * g != L:
        raise ValueError(f"{L} patches do not form a square grid")
    x = x.reshape(n, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, g * p, g * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """patches: (N, L, P) -> each patch shifted to zero mean and unit variance (MAE's norm_pix_loss target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE
    return (patches - mean) / (var + eps) ** 0.5
