"""Training recipes as data: CAN and its ablations differ only in views, mask ratio, noise and loss weights; the
joint-embedding recipes (MSCN with SimCLR or BYOL, SupCon) add their heads and which model family runs them.

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
    byol_weight: float = 0.0  # BYOL's 2 - 2 cos regression onto an EMA target (model.byol)
    supcon_weight: float = 0.0  # supervised contrastive loss over labelled samples (Khosla et al. 2020)
    # Which module runs the recipe (model.build.MODELS): "can" = CANModel (ViT, token masking, decoder),
    # "siamese" = SiameseModel (any backbone, full or pipeline-masked views), "byol" = BYOLModel.
    family: str = "can"
    # Projector defaults (a ModelConfig field left None keeps them): hidden None = the encoder's width.
    proj_hidden_dim: int | None = None
    proj_out_dim: int = 128
    proj_batchnorm: bool = False  # BatchNorm after each hidden Linear
    proj_out_batchnorm: bool = False  # BatchNorm after the last Linear too (SimCLR's head, as MSCN uses it)
    pred_hidden_dim: int = 0  # BYOL predictor's hidden width; 0 = no predictor

    @property
    def weights(self) -> dict[str, float]:
        """The weight of every term that is on."""
        all_weights = {
            "contrastive": self.contrastive_weight,
            "reconstruction": self.reconstruction_weight,
            "denoise": self.denoise_weight,
            "byol": self.byol_weight,
            "supcon": self.supcon_weight,
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
    # MSCN (Jing et al. 2022, appendix): masks are applied to pixels by the pipeline, so mask_ratio here is 0.
    # SimCLR head 2048 -> 2048 -> 256 with BatchNorm after every layer; InfoNCE over the global batch.
    "mscn_simclr": Recipe(
        2, 0.0, 0.0, contrastive_weight=1.0, reconstruction_weight=0.0, denoise_weight=0.0, family="siamese",
        proj_out_dim=256, proj_batchnorm=True, proj_out_batchnorm=True,
    ),
    # BYOL head: projector 2048 -> 4096 -> 256 and predictor 256 -> 4096 -> 256, BatchNorm except after the last.
    "mscn_byol": Recipe(
        2, 0.0, 0.0, contrastive_weight=0.0, reconstruction_weight=0.0, denoise_weight=0.0, byol_weight=1.0,
        family="byol", proj_hidden_dim=4096, proj_out_dim=256, proj_batchnorm=True, pred_hidden_dim=4096,
    ),
    # SupCon authors' head: Linear(D, D) -> ReLU -> Linear(D, 128), no BatchNorm; full views (no masking).
    "supcon": Recipe(
        2, 0.0, 0.0, contrastive_weight=0.0, reconstruction_weight=0.0, denoise_weight=0.0, supcon_weight=1.0,
        family="siamese",
    ),
}  # fmt: skip


def resolve_recipe(cfg: ModelConfig) -> Recipe:
    """The named recipe with the config's overrides (fields left None keep the recipe's value), checked."""
    overrides = {
        "mask_ratio": cfg.mask_ratio,
        "noise_sigma_max": cfg.noise_sigma_max,
        "contrastive_weight": cfg.contrastive_weight,
        "reconstruction_weight": cfg.reconstruction_weight,
        "denoise_weight": cfg.denoise_weight,
        "proj_hidden_dim": cfg.proj_hidden_dim,
        "proj_out_dim": cfg.proj_out_dim,
        "proj_batchnorm": cfg.proj_batchnorm,
        "pred_hidden_dim": cfg.pred_hidden_dim,
    }
    recipe = dataclasses.replace(RECIPES[cfg.recipe], **{k: v for k, v in overrides.items() if v is not None})
    if not recipe.weights:
        raise ValueError(f"recipe {cfg.recipe!r} with these overrides turns every loss term off")
    if not 0.0 <= recipe.mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {recipe.mask_ratio}")
    joint = {"contrastive", "byol", "supcon"} & set(recipe.weights)
    if joint and recipe.num_views != 2:
        raise ValueError(f"the {sorted(joint)} term(s) need two views")
    if recipe.family != "can" and recipe.uses_decoder:
        raise ValueError(f"recipe {cfg.recipe!r} ({recipe.family}) has no decoder for reconstruction / denoise")
    if recipe.family != "can" and (recipe.mask_ratio > 0 or recipe.noise_sigma_max > 0):
        raise ValueError("joint-embedding recipes take views masked by the pipeline: mask_ratio and noise must be 0")
    if recipe.family == "can" and {"byol", "supcon"} & set(recipe.weights):
        raise ValueError("byol and supcon terms are run by the siamese / byol families, not CAN")
    is_byol = recipe.family == "byol"
    if is_byol != ("byol" in recipe.weights) or is_byol != (recipe.pred_hidden_dim > 0):
        raise ValueError("the byol term, the byol family and a predictor (pred_hidden_dim > 0) go together")
    if recipe.reconstruction_weight > 0 and recipe.mask_ratio == 0:
        raise ValueError("the reconstruction term needs masked patches (mask_ratio > 0)")
    if recipe.denoise_weight > 0 and recipe.noise_sigma_max <= 0:
        raise ValueError("the denoise term needs noise (noise_sigma_max > 0)")
    return recipe
