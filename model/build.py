"""The one entry point that turns a ModelConfig into a model: the recipe's family picks the class."""

from __future__ import annotations

from typing import Callable

from torch import nn

from model.byol import BYOLModel
from model.can import CANModel
from model.config import ModelConfig
from model.recipes import RECIPES
from model.siamese import SiameseModel

# Every model takes forward(view1, view2=None, mask_keys1=None, mask_keys2=None, labels=None, ...) and returns
# {"loss", named terms}; every model has param_groups(weight_decay), on_step_applied(step, total_steps) (the trainer
# calls it after each applied optimizer step: BYOL's EMA target update, a no-op elsewhere), num_views, recipe, weights.
MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "can": CANModel,  # ViT; CAN, MAE, SimCLR with token masking and a pixel decoder
    "siamese": SiameseModel,  # ViT or ResNet-50; MSCN-SimCLR, SupCon
    "byol": BYOLModel,  # ViT or ResNet-50; MSCN-BYOL (EMA target: update_target / target_momentum)
}


def build_model(cfg: ModelConfig) -> nn.Module:
    return MODELS[RECIPES[cfg.recipe].family](cfg)
