"""Optimizer parameter groups shared by every model: what is decayed, and what LARS leaves unadapted."""

from __future__ import annotations

from torch import nn

# Parameters never decayed besides biases and norm weights (every 1-D parameter): the ViT's learned tokens and
# embeddings (a ResNet has none).
NO_DECAY_SUFFIXES = ("cls_token", "mask_token", "pos_embed")


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_suffixes: tuple[str, ...] = NO_DECAY_SUFFIXES
) -> list[dict]:
    """Two groups of the trainable parameters (requires_grad; a BYOL target is not one):

    decayed: weight matrices and conv kernels, {"weight_decay": weight_decay, "lars_exclude": False};
    not decayed: biases, norm weights (every tensor with ndim <= 1) and names ending in no_decay_suffixes,
    {"weight_decay": 0.0, "lars_exclude": True}. AdamW ignores lars_exclude; LARS (jobs/lars.py) also skips
    the trust-ratio adaptation there, as SimCLR and BYOL do for biases and BatchNorm.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(no_decay_suffixes)
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
