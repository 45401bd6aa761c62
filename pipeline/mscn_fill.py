"""MSCN noise fill and batch fields, on the trainer's device (after DALI).

The fill is per pixel, so it cannot be drawn on the host at mask resolution, and DALI's random operators take only a
build-time seed (no per-batch seed input), so their draws would not survive a resume. Here each masked copy's noise
comes from a torch.Generator seeded with that copy's host-drawn noise_seed (mscn_params.py, a pure function of seed,
rank, batch index, view and copy): the same batch index gives the same noise after a resume. On the GPU it is one
randn and one where per copy.
"""

from __future__ import annotations

import torch

from pipeline.config import MSCNMaskConfig
from pipeline.mscn_params import MaskParams


def noise_fill(view: torch.Tensor, keep: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    """view [B,3,H,W] float32, keep [B,3,H,W] bool (True = visible) -> [B,3,H,W]: view where keep, N(0, std^2) where
    masked. The noise is drawn for every pixel (fixed count), from torch.Generator(seed) on view's device."""
    gen = torch.Generator(device=view.device)
    gen.manual_seed(seed)
    noise = torch.randn(view.shape, generator=gen, device=view.device, dtype=view.dtype)
    return torch.where(keep, view, noise * std)


def mscn_batch_fields(views: list[torch.Tensor], keeps: list[torch.Tensor], masks: list[list[MaskParams]],
                      cfg: MSCNMaskConfig) -> dict[str, torch.Tensor]:
    """views: per view the high-passed view [B,3,H,W]; keeps: per (view, copy) in keep_masks' order [B,3,H,W] uint8.

    Returns "view1", "view2" (masked, noise-filled) and, when num_masks > 1, "views_extra" [B, M-1, 3, H, W]: view 1's
    other masked copies (same augmentation, own masks and noise). With debug_outputs also "keep1", "keep2",
    "keep_extra" (bool, True = visible) and "clean1", "clean2" (the high-passed views before masking)."""
    out: dict[str, torch.Tensor] = {}
    filled: list[list[torch.Tensor]] = []
    kept: list[list[torch.Tensor]] = []
    it = iter(keeps)
    for v, (view, copies) in enumerate(zip(views, masks)):
        std = cfg.noise_std[min(v, 1)]
        ks = [next(it).bool() for _ in copies]
        filled.append([noise_fill(view, k, std, m.noise_seed) for k, m in zip(ks, copies)])
        kept.append(ks)
    for v in range(len(views)):
        out[f"view{v + 1}"] = filled[v][0]
    if cfg.num_masks > 1:
        out["views_extra"] = torch.stack(filled[0][1:], 1)
    if cfg.debug_outputs:
        for v, view in enumerate(views):
            out[f"keep{v + 1}"], out[f"clean{v + 1}"] = kept[v][0], view
        if cfg.num_masks > 1:
            out["keep_extra"] = torch.stack(kept[0][1:], 1)
    return out
