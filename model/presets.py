"""ViT presets: the widths, depths and head counts of the standard ViT sizes (Dosovitskiy et al.; timm names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTPreset:
    embed_dim: int  # token width D
    depth: int  # number of transformer blocks
    num_heads: int  # attention heads; D / num_heads is the head width (64 for all of these)
    patch_size: int = 16  # default patch side in pixels; a config may override it
    in_timm: bool = True  # timm has this architecture under timm_model_name's name


VIT_PRESETS: dict[str, ViTPreset] = {
    # Not a standard size: vit_tiny at half its depth, for CPU-minute proofs (make test's learning test) where the
    # 12 blocks of vit_tiny cost twice the time for no measured gain on 32 px digits.
    "vit_micro": ViTPreset(embed_dim=192, depth=6, num_heads=3, in_timm=False),
    "vit_tiny": ViTPreset(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ViTPreset(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTPreset(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTPreset(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": ViTPreset(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}


def timm_model_name(preset: str, patch_size: int, img_size: int) -> str | None:
    """timm's name for the same architecture, e.g. 'vit_large_patch16_224' (what timm.create_model expects); None for
    a preset timm does not have."""
    return f"{preset}_patch{patch_size}_{img_size}" if VIT_PRESETS[preset].in_timm else None
