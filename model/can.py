"""CAN (Mishra et al. 2022): contrastive + masked autoencoding + noise prediction, in one ViT pass per view.

Reads like MAE's models_mae.py: stack views -> add noise -> random masking -> encoder on visible patches ->
contrastive head on pooled tokens, decoder on all positions -> losses. The recipe (model/recipes.py) decides which
terms exist; a term that is off has no modules and costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.decoder import Decoder
from model.distributed import gather_with_grad
from model.losses import info_nce_against, masked_mse
from model.masking import random_masking
from model.noise import sample_noise
from model.param_groups import NO_DECAY_SUFFIXES, param_groups
from model.patches import normalize_patches, patchify
from model.projector import build_projector
from model.recipes import resolve_recipe
from model.vit import vit_from_preset


class CANModel(nn.Module):
    """ViT encoder + (if the recipe has a contrastive term) projector + (if it has a pixel term) decoder.

    Attributes the trainer uses: encoder (VisionTransformer), num_views, num_patches (L), recipe (the resolved
    model.recipes.Recipe), weights ({term: weight} of the terms that are on).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.recipe = resolve_recipe(cfg)
        if self.recipe.family != "can" or cfg.backbone != "vit":
            raise ValueError(f"CANModel runs the ViT CAN family; build {cfg.recipe!r} with model.build.build_model")
        self.weights = self.recipe.weights  # {term: weight} for the terms that are on
        self.num_views = self.recipe.num_views
        self.mask_ratio = self.recipe.mask_ratio
        self.noise_sigma_max = self.recipe.noise_sigma_max
        self.temperature = cfg.temperature
        self.norm_pix_loss = cfg.norm_pix_loss
        self.patch_size = cfg.resolved_patch_size

        self.encoder = vit_from_preset(cfg.preset, cfg.img_size, cfg.patch_size, cfg.drop_path, cfg.global_pool)
        self.num_patches = self.encoder.num_patches
        width = self.encoder.embed_dim
        r = self.recipe
        self.projector = (
            build_projector(width, r.proj_hidden_dim or width, r.proj_out_dim, cfg.proj_depth, r.proj_batchnorm)
            if "contrastive" in self.weights
            else None
        )
        self.decoder = (
            Decoder(
                grid_size=self.encoder.patch_embed.grid_size,
                encoder_dim=width,
                patch_dim=self.patch_size**2 * 3,
                dim=cfg.decoder_dim,
                depth=cfg.decoder_depth,
                num_heads=cfg.decoder_heads,
                noise_sigma_max=self.noise_sigma_max,
                noise_sinusoid_dim=cfg.noise_sinusoid_dim,
            )
            if self.recipe.uses_decoder
            else None
        )

    def stack_views(
        self, views: tuple[torch.Tensor | None, ...], keys: tuple[torch.Tensor | None, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """views: num_views x (B, 3, H, W); keys: matching (B, L) or None -> imgs (V*B, 3, H, W), keys (V*B, L).

        Views go on the batch axis so the encoder and decoder run once for all of them.
        """
        if sum(v is not None for v in views) != self.num_views or views[0] is None:
            expected = "view1 and view2" if self.num_views == 2 else "view1 only"
            raise ValueError(f"this recipe takes {self.num_views} view(s): {expected}")
        views, keys = views[: self.num_views], keys[: self.num_views]
        keys = tuple(
            torch.rand(v.shape[0], self.num_patches, device=v.device) if k is None else k for v, k in zip(views, keys)
        )
        return torch.cat(views), torch.cat(keys)

    def forward_encoder(
        self, imgs: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, 3, H, W); keys: (N, L) -> latent (N, 1 + K, D), mask (N, L) 0 keep 1 remove, ids_restore.

        With mask_ratio 0 (simclr) every patch is kept, in key order: attention does not care about token order.
        """
        ids_keep, mask, ids_restore = random_masking(keys, self.mask_ratio)
        return self.encoder.forward_encoder(imgs, ids_keep), mask, ids_restore

    def forward_contrastive(self, latent: torch.Tensor) -> torch.Tensor:
        """latent: (2B, 1 + K, D), view 1 then view 2 -> InfoNCE with negatives from every rank's batch."""
        z = self.projector(self.encoder.forward_head(latent, pre_logits=True))  # (2B, E)
        z1, z2 = z.chunk(2)
        gathered, offset = gather_with_grad(torch.stack([z1, z2], dim=1))  # (world * B, 2, E), one collective
        return info_nce_against(z1, z2, gathered[:, 0], gathered[:, 1], offset, self.temperature)

    def forward_pixel_losses(
        self, imgs: torch.Tensor, noise: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """imgs: (N, 3, H, W) clean views; noise: (N, 3, H, W) what was added; pred: (N, L, p*p*3); mask: (N, L).

        reconstruction: the clean pixels (per-patch normalised with norm_pix_loss) at masked patches (mask 1);
        denoise: the added noise at visible patches (mask 0). One head predicts both.
        """
        losses = {}
        if "reconstruction" in self.weights:
            target = patchify(imgs, self.patch_size)
            target = normalize_patches(target) if self.norm_pix_loss else target
            losses["reconstruction"] = masked_mse(pred, target, mask)
        if "denoise" in self.weights:
            losses["denoise"] = masked_mse(pred, patchify(noise, self.patch_size), 1 - mask)
        return losses

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor | None = None,
        mask_keys1: torch.Tensor | None = None,
        mask_keys2: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """view*: (B, 3, H, W) normalised; mask_keys*: (B, L) uniform [0, 1) (None = drawn here); labels: (B,)
        accepted and unused (CAN is self-supervised), so the trainer calls every model with the same batch fields.

        Returns {"loss", and each term that is on: "contrastive", "reconstruction", "denoise"}, all scalars;
        "loss" is the weighted sum. Each term averages over both views.
        """
        imgs, keys = self.stack_views((view1, view2), (mask_keys1, mask_keys2))
        noise, sigma = sample_noise(imgs, self.noise_sigma_max)
        latent, mask, ids_restore = self.forward_encoder(imgs + noise, keys)
        losses = {}
        if self.projector is not None:
            losses["contrastive"] = self.forward_contrastive(latent)
        if self.decoder is not None:
            pred = self.decoder(latent, ids_restore, sigma)
            losses.update(self.forward_pixel_losses(imgs, noise, pred, mask))
        losses["loss"] = sum(self.weights[term] * value for term, value in losses.items())
        return losses

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decayed matrices; undecayed (and LARS-excluded) biases, norm weights, position embeddings and tokens."""
        return param_groups(self, weight_decay, NO_DECAY_SUFFIXES)

    def on_step_applied(self, step: int, total_steps: int) -> None:
        """The trainer's hook after each applied optimizer step (every rank): CAN keeps no state outside its weights."""


def build_model(cfg: ModelConfig) -> CANModel:
    """CAN-family recipes only; model.build.build_model is the entry point for every recipe."""
    return CANModel(cfg)
