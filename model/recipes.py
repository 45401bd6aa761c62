"""Training recipes as data: CAN and its ablations differ only in views, mask ratio, noise and loss weights.

A term with weight 0 is off: the model builds and runs none of its modules (see CANModel).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.config import ModelConfig

@dataclass(frozen=True)
class Recipe:
    num_views: int  # augmented views per image
    mask_ratio: float  # fraction of patches removed from each view before the encoder
    noise_sigma_max: float  # per-view noise level sigma ~ U[0, sigma_max); 0 = no noise
    contrastive_weight: float
    reconstruction_weight: float
    denoise_weight: float

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every term that is on."""
        all_weights = {
            "contrastive": self.contrastive_weight,
            "reconstruction": self.reconstruction_weight,
            "denoise": self.denoise_weight,
        }
        return {t: w for t, w in all_weights.items() if w > 0}

    @property
    def uses_decoder(self) -> bool:
        return self.reconstruction_weight > 0 or self.denoise_weight > 0


RECIPES: dict[str, Recipe] = {
    # The authors' port: 0.97 * (0.7 * rec + 0.3 * noise) + 0.03 * InfoNCE, rounded as CAN_SPEC.md.
    "can": Recipe(2, 0.5, 0.05, contrastive_weight=0.03, reconstruction_weight=0.67, denoise_weight=0.30),
    "can_no_noise": Recipe(2, 0.5, 0.0, contrastive_weight=0.03, reconstruction_weight=0.97, denoise_weight=0.0),
    "mae": Recipe(1, 0.75, 0.0, contrastive_weight=0.0, reconstruction_weight=1.0, denoise_weight=0.0),
    "simclr": Recipe(2, 0.0, 0.0, contrastive_weight=1.0, reconstruction_weight=0.0, denoise_weight=0.0),
}


def resolve_recipe(cfg: ModelConfig) -> Recipe:
    """The named recipe with the config's overrides (fields left None keep the recipe's value), checked."""
    overrides = {
        "mask_ratio": cfg.mask_ratio,
        "noise_sigma_max": cfg.noise_sigma_max,
        "contrastive_weight": cfg.contrastive_weight,
        "reconstruction_weight": cfg.reconstruction_weight,
        "denoise_weight": cfg.denoise_weight,
    }
    recipe = dataclasses.replace(RECIPES[cfg.recipe], **{k: v for k, v in overrides.items() if v is not None})
    if not recipe.weights:
        raise ValueError(f"recipe {cfg.recipe!r} with these overrides turns every loss term off")
    if not 0.0 <= recipe.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {recipe.mask_ratio}")
    if recipe.contrastive_weight > 0 and recipe.num_views != 2:
        raise ValueError("the contrastive term needs two views")
    if recipe.reconstruction_weight > 0 and recipe.mask_ratio == 0:
        raise ValueError("the reconstruction term needs masked patches (mask_ratio > 0)")
    if recipe.denoise_weight > 0 and recipe.noise_sigma_max <= 0:
        raise ValueError("the denoise term needs noise (noise_sigma_max > 0)")
    return recipe
