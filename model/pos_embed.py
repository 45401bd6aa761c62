"""Fixed 2-D sin-cos position embeddings, as MAE's get_2d_sincos_pos_embed (util/pos_embed.py)."""

from __future__ import annotations

import torch


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) positions -> (M, embed_dim): first half sin, second half cos, frequencies 1 / 10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    # float64 as MAE's numpy code, so the table is the same to the last float32 bit.
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Returns (grid_size**2 [+1], embed_dim) float32, row-major over the patch grid; the cls row (first) is zeros.

    Half of the width encodes the column (w) and half the row (h), in MAE's order (w first): the token order
    matches patchify's (row by row).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat(
        [get_1d_sincos_pos_embed(embed_dim // 2, grid_w), get_1d_sincos_pos_embed(embed_dim // 2, grid_h)], dim=1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
