"""ModelConfig: everything that defines the network and its objective (see contracts.md, model/)."""

from __future__ import annotations

from dataclasses import dataclass

from model.backbones import BACKBONES
from model.presets import VIT_PRESETS
from model.recipes import RECIPES


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "vit_base"  # encoder size, a key of model.presets.VIT_PRESETS
    img_size: int = 224  # square input side in pixels
    patch_size: int | None = None  # None = the preset's (16; 14 for vit_huge)
    recipe: str = "can"  # a key of model.recipes.RECIPES (can, mae, simclr, ..., mscn_simclr, mscn_byol, supcon)
    backbone: str = "vit"  # "vit" (preset, patch_size apply) or "resnet50" (joint-embedding recipes only)
    resnet_width: int = 64  # ResNet stem / first-stage width: 64 = ResNet-50 (2048-d features); smaller for tests
    zero_init_residual: bool = False  # ResNet: last BN gamma of each block starts at 0 (Goyal et al. 2017)
    extra_masks: int = 0  # MSCN multi-masks: extra masked versions of view 1 per image (batch field views_extra)
    # BYOL's tau_base. 0.996 is BYOL's (and so MSCN's) value for batch 4096 and 1000 epochs; short or small-batch
    # runs take fewer steps for the target to follow, and ~0.99 (BYOL's own ablations, solo-learn) suits them better.
    ema_momentum: float = 0.996
    mask_ratio: float | None = None  # None = the recipe's (0.5 can, 0.75 mae, 0 simclr)
    noise_sigma_max: float | None = None  # None = the recipe's (0.05 can, else 0)
    temperature: float = 0.1  # InfoNCE temperature (SimCLR, CAN)
    proj_hidden_dim: int | None = None  # projector hidden width; None = the recipe's (encoder width; 4096 BYOL)
    proj_out_dim: int | None = None  # embedding width; None = the recipe's (128; 256 for MSCN)
    proj_depth: int = 2  # Linear layers in the projector
    proj_batchnorm: bool | None = None  # BatchNorm between projector layers; None = the recipe's (on for MSCN)
    pred_hidden_dim: int | None = None  # BYOL predictor hidden width; None = the recipe's (4096)
    decoder_dim: int = 512  # MAE's decoder width
    decoder_depth: int = 8  # MAE's decoder depth
    decoder_heads: int = 16
    noise_sinusoid_dim: int = 256  # width of the sinusoid of the noise level before its MLP
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels (MAE: better representations)
    contrastive_weight: float | None = None  # loss weights; None = the recipe's
    reconstruction_weight: float | None = None
    denoise_weight: float | None = None
    drop_path: float = 0.0  # stochastic depth rate of the last encoder block
    global_pool: str = "avg"  # "avg" = mean of patch tokens, "token" = cls token (contrastive branch and probes)

    def __post_init__(self):
        if self.preset not in VIT_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {sorted(VIT_PRESETS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; known: {sorted(RECIPES)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        if self.backbone != "vit" and RECIPES[self.recipe].family == "can":
            raise ValueError(f"recipe {self.recipe!r} runs on the ViT only (token masking, decoder)")
        if self.extra_masks < 0 or not 0.0 <= self.ema_momentum <= 1.0:
            raise ValueError(f"extra_masks must be >= 0 and ema_momentum in [0, 1]: {self.extra_masks}, "
                             f"{self.ema_momentum}")
        if self.global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {self.global_pool!r}")

    @property
    def resolved_patch_size(self) -> int:
        return self.patch_size or VIT_PRESETS[self.preset].patch_size

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.resolved_patch_size) ** 2
