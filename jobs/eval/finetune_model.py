"""The fine-tuned network: a pre-trained ViT encoder with drop path and a linear head, trained end to end.

Classifier owns its optimizer groups (layer-wise lr decay, jobs/eval/layer_decay.py) through the same
`param_groups(weight_decay)` method CANModel has, so the trainer's jobs.engine.build_engine builds its engine unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jobs.eval.encoder_source import EncoderSource, load_source
from jobs.eval.layer_decay import param_groups_lrd
from model.vit import VisionTransformer


class Classifier(nn.Module):
    """images (N, 3, H, W) -> logits (N, C); forward with labels returns the named loss terms."""

    def __init__(self, vit: VisionTransformer, layer_decay: float, label_smoothing: float):
        super().__init__()
        self.vit = vit
        self.layer_decay = layer_decay
        self.label_smoothing = label_smoothing

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """labels: (N,) int64 in [0, C), -1 = unlabelled (ignored). Returns {"loss", "top1"}, scalars.

        The loss is label-smoothed cross-entropy in fp32 (bf16 logits lose the small smoothed targets); top1 is the
        batch accuracy in percent, a cheap learning signal for the log (no gradient).
        """
        logits = self.logits(images).float()
        loss = F.cross_entropy(logits, labels, ignore_index=-1, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            seen = labels >= 0
            top1 = (logits.argmax(dim=1)[seen] == labels[seen]).float().mean() * 100
        return {"loss": loss, "top1": top1}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Layer-decayed groups, each with "lr_scale" (set_layer_lrs multiplies the scheduled lr by it)."""
        groups = param_groups_lrd(self.vit, self.vit.depth, weight_decay, self.layer_decay)
        return [{k: v for k, v in g.items() if k != "names"} for g in groups]  # names: strings, not optimizer state


def set_layer_lrs(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's lr = lr * its lr_scale: block i of a depth-d ViT gets lr * layer_decay ** (d - i)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_classifier(source: EncoderSource, num_classes: int, global_pool: str, drop_path: float,
                     layer_decay: float, label_smoothing: float, head_init_std: float) -> Classifier:
    """The encoder's weights in a ViT of the same shape with drop path and a fresh head (the only new weights)."""
    encoder = load_source(source, global_pool)
    if not isinstance(encoder, VisionTransformer):
        raise ValueError(f"{source.path}: fine-tuning takes a ViT encoder, this is a {type(encoder).__name__}")
    pe = encoder.patch_embed
    vit = VisionTransformer(img_size=pe.img_size, patch_size=pe.patch_size, embed_dim=encoder.embed_dim,
                            depth=encoder.depth, num_heads=encoder.num_heads, drop_path=drop_path,
                            global_pool=global_pool, num_classes=num_classes)
    missing, unexpected = vit.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise RuntimeError(f"encoder weights do not fit: missing {missing}, unexpected {unexpected}")
    nn.init.trunc_normal_(vit.head.weight, std=head_init_std)
    nn.init.zeros_(vit.head.bias)
    return Classifier(vit, layer_decay, label_smoothing)
