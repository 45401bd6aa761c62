"""Vision Transformer encoder with timm's parameter names and interface, plus a masked (visible-tokens) forward.

Parameter names mirror timm's VisionTransformer (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}, norm) so exporting to timm is a near-identity mapping (model/export.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from model.block import LAYER_NORM_EPS, Block, init_weights
from model.pos_embed import get_2d_sincos_pos_embed
from model.presets import VIT_PRESETS


class Float32Conv2d(nn.Conv2d):
    """A Conv2d that PatchEmbed always runs in float32. Its own class so that DeepSpeed's autocast support, which
    matches modules by exact class (torch.nn.Linear, torch.nn.Conv2d, ...), does not mark its weights as safe to
    all-gather in bf16 under ZeRO-3: they would reach this float32 convolution rounded to bf16 in some forwards and
    not in others (a step after the kNN monitor, the first step of a run), so a run's losses would depend on
    whether the monitor ran and a resumed run would not repeat the uninterrupted one. Its gradients are summed across
    ranks in fp32 too (DeepSpeed sums marked weights' gradients in bf16 when the reduce dtype is): 0.1% of a ViT's."""


class PatchEmbed(nn.Module):
    """imgs: (N, 3, H, W) -> (N, L, D), L = (H / p) * (W / p), patches in row-major order (as patchify)."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = Float32Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W), any float dtype -> (N, L, D) in the projection weight's dtype.

        The projection runs in float32 whatever the training precision (autocast off too): CAN adds noise of sigma
        U[0, 0.05) to the pixels, and bf16 pixels (8 significant bits: a step of 0.0156 at 2.0) would round most of
        it away, leaving a denoise target the encoder never saw. The tokens keep it as a linear projection. It costs
        ~0.1% of a ViT's FLOPs (3 input channels).
        """
        w, b = self.proj.weight, self.proj.bias
        # (autocast exists on real devices only; the meta device, used to build the large presets, has none)
        autocast_off = torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else nullcontext()
        with autocast_off:
            y = F.conv2d(x.float(), w.float(), b.float(), stride=self.patch_size)
        return y.flatten(2).transpose(1, 2).to(w.dtype)


class VisionTransformer(nn.Module):
    """ViT with a cls token, fixed sin-cos position embeddings, pre-norm blocks and a final LayerNorm.

    forward_features(x) runs every patch; forward_encoder(x, ids_keep) runs only the kept (visible) patches.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        global_pool: str = "avg",
        num_classes: int = 0,
    ):
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        self.embed_dim = embed_dim
        self.num_features = embed_dim  # width of the pooled features (timm's name; the ResNet has it too)
        self.depth = depth
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A buffer, not a frozen Parameter: fixed, saved in the state_dict under timm's name, invisible to optimizers.
        pos = get_2d_sincos_pos_embed(embed_dim, self.patch_embed.grid_size, cls_token=True)
        self.register_buffer("pos_embed", pos.unsqueeze(0))
        # timm's stochastic-depth schedule: rate rising linearly with depth.
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The patch projection is a Linear over flattened patches (MAE), so give it a Linear's init.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for name, module in self.named_modules():
            if name != "patch_embed.proj":
                init_weights(module)

    def forward_encoder(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, 3, H, W); ids_keep: (N, K) indices of the patches to encode (None = all L).

        Returns (N, 1 + K, D): the cls token then the kept patches in ids_keep order, after the final norm.
        """
        x = self.patch_embed(x)
        # Buffers keep float32 when DeepSpeed casts a model to bf16 (it casts parameters only): follow the tokens.
        pos = self.pos_embed.to(x.dtype)
        x = x + pos[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, H, W) -> (N, 1 + L, D), the cls token first."""
        return self.forward_encoder(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (N, 1 + K, D) -> pooled (N, D) (mean of patch tokens, or the cls token), or logits without pre_logits."""
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def vit_from_preset(
    preset: str,
    img_size: int = 224,
    patch_size: int | None = None,
    drop_path: float = 0.0,
    global_pool: str = "avg",
    num_classes: int = 0,
) -> VisionTransformer:
    """A VisionTransformer of a named size (model/presets.py); patch_size None takes the preset's."""
    p = VIT_PRESETS[preset]
    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size or p.patch_size,
        embed_dim=p.embed_dim,
        depth=p.depth,
        num_heads=p.num_heads,
        drop_path=drop_path,
        global_pool=global_pool,
        num_classes=num_classes,
    )
