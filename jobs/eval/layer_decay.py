"""Layer-wise learning-rate decay for fine-tuning a ViT (BEiT, Bao et al. 2021; MAE's lr_decay.py).

Layer ids: 0 = embeddings (patch_embed, cls_token, pos_embed), i + 1 = blocks.i, depth + 1 = everything after the
blocks (final norm, classifier head). A parameter's lr is scaled by decay ** (depth + 1 - layer_id): the head trains at
the full rate and each block below it at `decay` times the rate of the one above, since lower layers hold the more
general features that pre-training got right.
"""

from __future__ import annotations

from torch import nn


def layer_id(name: str, depth: int) -> int:
    """name: a parameter name of a VisionTransformer (timm names), optionally under an 'encoder.' prefix."""
    name = name.removeprefix("encoder.")
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups_lrd(model: nn.Module, depth: int, weight_decay: float, layer_decay: float) -> list[dict]:
    """Param groups with "lr_scale" (multiply the scheduled lr by it) and weight decay off for 1-D tensors and tokens.

    One group per (layer, decayed or not), so an optimizer sees at most 2 * (depth + 2) groups.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.removeprefix("encoder.") in ("cls_token", "pos_embed")
        lid = layer_id(name, depth)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - lid),
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())
