"""Analytic FLOPs per image for any preset and recipe (the cost model of CAN_SPEC.md), for MFU and comparisons.

FLOPs = 2 x multiply-adds of the matrix products; training = 3 x forward (backward computes two products per
forward one). A transformer block on N tokens of width d costs 24*N*d^2 (qkv 6, proj 2, MLP 16) + 4*N^2*d
(q k^T and attn v). Elementwise work (norms, softmax, GELU) and the InfoNCE logits (batch-size dependent, a few
MFLOPs per image) are left out, as in the usual MFU accounting.

Joint-embedding recipes (siamese / byol families) run every view whole through the backbone (ViT or ResNet-50,
model/flops_resnet.py) and heads; BYOL's target network only runs forward, so it counts 1x, not 3x.
"""

from __future__ import annotations

import argparse
import dataclasses

from model.config import ModelConfig
from model.flops_resnet import resnet_forward_flops
from model.masking import num_kept
from model.presets import VIT_PRESETS
from model.recipes import RECIPES, resolve_recipe


def attention_flops(tokens: int, width: int) -> float:
    """Forward FLOPs of the two attention products, q k^T and attn v, over all heads."""
    return 4 * tokens**2 * width


def block_flops(tokens: int, width: int) -> float:
    """Forward FLOPs of one pre-norm transformer block (MLP ratio 4) on `tokens` tokens."""
    return 24 * tokens * width**2 + attention_flops(tokens, width)


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
    return 2 * tokens * d_in * d_out


def mlp_flops(dims: list[int]) -> float:
    """One row through Linear layers of widths dims[0] -> dims[1] -> ... -> dims[-1]."""
    return sum(linear_flops(1, a, b) for a, b in zip(dims[:-1], dims[1:]))


def backbone_flops(cfg: ModelConfig) -> tuple[float, int]:
    """Forward FLOPs of one whole (unmasked-token) image through cfg's backbone, and its feature width."""
    if cfg.backbone == "resnet50":
        return resnet_forward_flops(cfg.img_size, cfg.resnet_width), cfg.resnet_width * 32
    vit = VIT_PRESETS[cfg.preset]
    p, L, d = cfg.resolved_patch_size, cfg.num_patches, vit.embed_dim
    return linear_flops(L, 3 * p * p, d) + vit.depth * block_flops(1 + L, d), d


def siamese_flops_breakdown(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per image (2 + extra_masks views) by part: encoder, projector (+ predictor), target (BYOL)."""
    recipe = resolve_recipe(cfg)
    backbone, width = backbone_flops(cfg)
    hidden = recipe.proj_hidden_dim or width
    projector = mlp_flops([width] + [hidden] * (cfg.proj_depth - 1) + [recipe.proj_out_dim])
    heads = projector
    if recipe.pred_hidden_dim:
        heads += mlp_flops([recipe.proj_out_dim, recipe.pred_hidden_dim, recipe.proj_out_dim])
    v = recipe.num_views + cfg.extra_masks
    target = v * (backbone + projector) if recipe.family == "byol" else 0.0
    return {"encoder": v * backbone, "projector": v * heads, "decoder": 0.0, "target": target}


def forward_flops_breakdown(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per image (all views) by part: encoder, projector, decoder (zero for parts a recipe lacks);
    joint-embedding recipes add "target" (BYOL's EMA network, zero for the others)."""
    recipe = resolve_recipe(cfg)
    if recipe.family != "can":
        return siamese_flops_breakdown(cfg)
    vit = VIT_PRESETS[cfg.preset]
    p, L, d = cfg.resolved_patch_size, cfg.num_patches, vit.embed_dim
    visible = 1 + num_kept(L, recipe.mask_ratio)  # cls + kept patches
    # The patch projection runs on every patch: masking happens after it, as in MAE.
    encoder = linear_flops(L, 3 * p * p, d) + vit.depth * block_flops(visible, d)
    projector = 0.0
    if "contrastive" in recipe.weights:
        hidden = recipe.proj_hidden_dim or d
        projector = mlp_flops([d] + [hidden] * (cfg.proj_depth - 1) + [recipe.proj_out_dim])
    decoder = 0.0
    if recipe.uses_decoder:
        dd = cfg.decoder_dim
        decoder = (
            linear_flops(visible, d, dd)  # decoder_embed
            + cfg.decoder_depth * block_flops(1 + L, dd)
            + linear_flops(L, dd, 3 * p * p)  # prediction head, patch tokens only
        )
        if recipe.noise_sigma_max > 0:
            decoder += linear_flops(1, cfg.noise_sinusoid_dim, dd) + linear_flops(1, dd, dd)
    v = recipe.num_views
    return {"encoder": v * encoder, "projector": v * projector, "decoder": v * decoder}


def forward_flops_per_image(cfg: ModelConfig) -> float:
    return sum(forward_flops_breakdown(cfg).values())


def train_flops_per_image(cfg: ModelConfig) -> float:
    """Training FLOPs per image (forward + backward, all views): the numerator of MFU. Parts that train count 3x
    their forward; BYOL's target, forward only and without gradient, counts 1x."""
    parts = forward_flops_breakdown(cfg)
    target = parts.pop("target", 0.0)
    return 3 * sum(parts.values()) + target


def flops_table(img_size: int = 224) -> str:
    """ViT presets x CAN-family recipes: forward and training GFLOPs per image, and training cost relative to can."""
    rows = [f"{'preset':<10} {'recipe':<13} {'fwd GFLOPs':>10} {'train GFLOPs':>12} {'x can':>6}"]
    for preset in VIT_PRESETS:
        can = train_flops_per_image(ModelConfig(preset=preset, img_size=img_size, recipe="can"))
        for recipe in (r for r, spec in RECIPES.items() if spec.family == "can"):
            cfg = ModelConfig(preset=preset, img_size=img_size, recipe=recipe)
            fwd, train = forward_flops_per_image(cfg), train_flops_per_image(cfg)
            rows.append(f"{preset:<10} {recipe:<13} {fwd / 1e9:>10.1f} {train / 1e9:>12.1f} {train / can:>6.2f}")
    return "\n".join(rows)


def joint_embedding_table(img_size: int = 224) -> str:
    """ResNet-50 and ViT-B x joint-embedding recipes (two views, no extra masks)."""
    rows = [f"{'backbone':<10} {'recipe':<13} {'fwd GFLOPs':>10} {'train GFLOPs':>12}"]
    for backbone in ("resnet50", "vit"):
        for recipe in (r for r, spec in RECIPES.items() if spec.family != "can"):
            cfg = ModelConfig(backbone=backbone, img_size=img_size, recipe=recipe)
            fwd, train = forward_flops_per_image(cfg), train_flops_per_image(cfg)
            name = backbone if backbone != "vit" else cfg.preset
            rows.append(f"{name:<10} {recipe:<13} {fwd / 1e9:>10.1f} {train / 1e9:>12.1f}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    img_size = parser.parse_args().img_size
    print(flops_table(img_size) + "\n\n" + joint_embedding_table(img_size))


if __name__ == "__main__":
    main()
