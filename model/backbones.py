"""Backbones for the joint-embedding models, as a registry: name -> builder of a module with the timm interface.

Every backbone has forward_features(x (N, 3, H, W)) and forward_head(feats, pre_logits=True) -> (N, D); the
builders return (module, D). The ViT pools as cfg.global_pool says (mean of patch tokens by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

from model.resnet import resnet50
from model.vit import vit_from_preset

if TYPE_CHECKING:
    from model.config import ModelConfig


def build_vit(cfg: ModelConfig) -> tuple[nn.Module, int]:
    vit = vit_from_preset(cfg.preset, cfg.img_size, cfg.patch_size, cfg.drop_path, cfg.global_pool)
    return vit, vit.embed_dim


def build_resnet50(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = resnet50(cfg.resnet_width, cfg.zero_init_residual)
    return net, net.num_features


BACKBONES: dict[str, Callable[[ModelConfig], tuple[nn.Module, int]]] = {
    "vit": build_vit,
    "resnet50": build_resnet50,
}
