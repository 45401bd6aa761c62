"""Joint-embedding models on any backbone: SimCLR / MSCN-SimCLR (InfoNCE) and SupCon, with MSCN's multi-masks.

MSCN (Jing et al. 2022) masks pixels (grid / focal masks, noise fill, high-pass filter) in the data pipeline, so the
model takes whole (masked) images: backbone -> pooled features -> projector -> pair losses. Views are stacked on the
batch axis and run through the network once, so BatchNorm sees every view of every image, as in SimCLR.

Views and pairs: view1 and view2 are the two branches (two augmentations of one image, each masked by the
pipeline). views_extra holds M further masked versions of view 1 (MSCN's multi-masks: same augmented crop as view 1,
other masks). The losses pair each branch-1 version with the other branch: (view1, view2), (extra_1, view2), ...,
(extra_M, view2) - the asymmetric pairs of MSCN section 4 - never two versions of view 1 with each other. Each term
is the mean over these 1 + M pairs of a symmetric pair loss.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbones import BACKBONES
from model.config import ModelConfig
from model.distributed import gather_no_grad, gather_with_grad
from model.losses import info_nce_against, supcon_against
from model.param_groups import param_groups
from model.projector import build_projector
from model.recipes import resolve_recipe


class SiameseModel(nn.Module):
    """One backbone and projector shared by every view; terms "contrastive" (InfoNCE) and / or "supcon".

    Attributes the trainer uses: encoder (the backbone, timm interface), num_views (2), extra_masks (M),
    num_patches (L of the mask keys the pipeline sends; unused here), recipe, weights ({term: weight}).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.recipe = resolve_recipe(cfg)
        self.weights = self.recipe.weights
        self.num_views = self.recipe.num_views
        self.extra_masks = cfg.extra_masks
        self.num_patches = cfg.num_patches
        self.temperature = cfg.temperature
        self.encoder, width = BACKBONES[cfg.backbone](cfg)
        r = self.recipe
        self.projector = build_projector(
            width, r.proj_hidden_dim or width, r.proj_out_dim, cfg.proj_depth, r.proj_batchnorm, r.proj_out_batchnorm
        )

    def stack_views(
        self, view1: torch.Tensor, view2: torch.Tensor | None, views_extra: torch.Tensor | None
    ) -> torch.Tensor:
        """view1, view2: (B, 3, H, W); views_extra: (B, M, 3, H, W) or None -> (V * B, 3, H, W), V = 2 + M,
        in the order view1, view2, extra_1, ..., extra_M."""
        if view2 is None:
            raise ValueError("joint-embedding recipes take two views: view1 and view2")
        m = 0 if views_extra is None else views_extra.shape[1]
        if m != self.extra_masks:
            raise ValueError(f"the model is configured for {self.extra_masks} extra masked views, got {m}")
        views = [view1, view2] + ([] if views_extra is None else list(views_extra.unbind(1)))
        return torch.cat(views)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, 3, H, W) -> projected embeddings (N, E)."""
        return self.projector(self.encoder.forward_head(self.encoder.forward_features(imgs), pre_logits=True))

    def pairs(self) -> list[tuple[int, int]]:
        """(branch-1 version, branch-2 view) indices into the stacked views: (0, 1), (2, 1), ..., (1 + M, 1)."""
        return [(0, 1)] + [(2 + m, 1) for m in range(self.extra_masks)]

    def forward_losses(self, z: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """z: (B, V, E) every view's embedding; labels: (B,) long, -1 = unlabelled -> the recipe's pair terms.

        Candidates (negatives, class-mates) come from every rank's batch: one all-gather of z, one of the labels.
        """
        gathered, offset = gather_with_grad(z)  # (world * B, V, E)
        losses = {}
        if "contrastive" in self.weights:
            per_pair = [
                info_nce_against(z[:, a], z[:, b], gathered[:, a], gathered[:, b], offset, self.temperature)
                for a, b in self.pairs()
            ]
            losses["contrastive"] = torch.stack(per_pair).mean()
        if "supcon" in self.weights:
            if labels is None:
                raise ValueError("the supcon term needs labels (B,), -1 where a sample has none")
            all_labels = gather_no_grad(labels)
            per_pair = [
                supcon_against(z[:, a], z[:, b], labels, gathered[:, a], gathered[:, b], all_labels, offset,
                               self.temperature)
                for a, b in self.pairs()
            ]  # fmt: skip
            losses["supcon"] = torch.stack(per_pair).mean()
        return losses

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor | None = None,
        mask_keys1: torch.Tensor | None = None,
        mask_keys2: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        views_extra: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """view1, view2: (B, 3, H, W) normalised, masked (MSCN) or not by the pipeline; views_extra: (B, M, 3, H, W)
        extra masked versions of view 1 (M = cfg.extra_masks); labels: (B,) long, -1 = no label (supcon needs them);
        mask_keys*: accepted and unused (the pipeline already masked the pixels; the ViT sees every patch).

        Returns {"loss", and each term that is on: "contrastive", "supcon"}, scalars; "loss" is the weighted sum.
        """
        b = view1.shape[0]
        z = self.embed(self.stack_views(view1, view2, views_extra))  # (V * B, E)
        losses = self.forward_losses(z.unflatten(0, (-1, b)).transpose(0, 1), labels)
        losses["loss"] = sum(self.weights[term] * value for term, value in losses.items())
        return losses

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decayed conv / Linear weights; undecayed, LARS-excluded biases and BatchNorm / LayerNorm parameters."""
        return param_groups(self, weight_decay)

    def on_step_applied(self, step: int, total_steps: int) -> None:
        """The trainer's hook after each applied optimizer step (every rank); BYOLModel moves its target here."""
