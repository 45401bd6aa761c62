"""BYOL (Grill et al. 2020) as MSCN runs it: online backbone + projector + predictor regress onto an EMA target.

Same views, pairs and multi-masks as SiameseModel (model/siamese.py). Every view goes through both networks; a pair
(a, b) costs 2 - 2 cos(q(a), z'(b)) + 2 - 2 cos(q(b), z'(a)), q the online prediction and z' the target projection
(BYOL's symmetrised loss, a sum of the two directions, whose scale BYOL's LARS learning rate was tuned on); the
"byol" term is the mean of that over the 1 + M pairs.

The target (target_encoder, target_projector) gets no gradient: requires_grad False and its forward runs under
torch.no_grad. It runs in train mode, so its BatchNorm uses batch statistics, as in BYOL. The trainer calls
on_step_applied(step, total_steps) after every applied optimizer step, which moves the target by
update_target(target_momentum(step, total_steps)).
"""

from __future__ import annotations

import copy

import torch

from model.config import ModelConfig
from model.ema import EMA, byol_momentum
from model.losses import byol_regression
from model.projector import build_projector
from model.siamese import SiameseModel


class BYOLModel(SiameseModel):
    """SiameseModel's online network plus a predictor and an EMA target; the one term is "byol"."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        out = self.recipe.proj_out_dim
        self.predictor = build_projector(out, self.recipe.pred_hidden_dim, out, 2, self.recipe.proj_batchnorm)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.momentum_base = cfg.ema_momentum
        self.ema = EMA()

    def online_and_target(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Matching parameter lists (target, online), in module order."""
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.target_encoder.parameters(), *self.target_projector.parameters()]
        return target, online

    @torch.no_grad()
    def embed_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, 3, H, W) -> target projections (N, E), no graph."""
        feats = self.target_encoder.forward_features(imgs)
        return self.target_projector(self.target_encoder.forward_head(feats, pre_logits=True))

    def forward(
        self,
        view1: torch.Tensor,
        view2: torch.Tensor | None = None,
        mask_keys1: torch.Tensor | None = None,
        mask_keys2: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        views_extra: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Arguments as SiameseModel.forward (labels and mask keys unused). Returns {"loss", "byol"}, scalars."""
        b = view1.shape[0]
        imgs = self.stack_views(view1, view2, views_extra)  # (V * B, 3, H, W)
        q = self.predictor(self.embed(imgs)).unflatten(0, (-1, b))  # (V, B, E)
        z = self.embed_target(imgs).unflatten(0, (-1, b))  # (V, B, E)
        per_pair = [byol_regression(q[a], z[c]) + byol_regression(q[c], z[a]) for a, c in self.pairs()]
        byol = torch.stack(per_pair).mean()
        return {"byol": byol, "loss": self.weights["byol"] * byol}

    def target_momentum(self, step: int, total_steps: int) -> float:
        """BYOL's cosine schedule from cfg.ema_momentum at step 0 to 1 at total_steps (model.ema.byol_momentum)."""
        return byol_momentum(step, total_steps, self.momentum_base)

    def on_step_applied(self, step: int, total_steps: int) -> None:
        """After optimizer step `step` (1-based) of total_steps, on every rank: the EMA update of the target."""
        self.update_target(self.target_momentum(step, total_steps))

    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online; call after each optimizer step (every rank)."""
        self.ema.update(*self.online_and_target(), momentum)
