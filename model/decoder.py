"""MAE-style decoder, conditioned on the noise level: one head predicts pixels (masked) and noise (visible)."""

from __future__ import annotations

import torch
from torch import nn

from model.noise import NoiseLevelEmbed, NoNoiseLevel
from model.pos_embed import get_2d_sincos_pos_embed
from model.block import LAYER_NORM_EPS, Block, init_weights


class Decoder(nn.Module):
    """Encoder tokens of the visible patches -> a prediction for every patch.

    Linear(D -> dim), a learned mask token at the masked positions, fixed sin-cos position embeddings, the
    noise-level embedding added to every token, `depth` pre-norm blocks, LayerNorm, Linear(dim -> p*p*3).
    """

    def __init__(
        self,
        grid_size: int,
        encoder_dim: int,
        patch_dim: int,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        noise_sigma_max: float = 0.0,
        noise_sinusoid_dim: int = 256,
    ):
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = get_2d_sincos_pos_embed(dim, grid_size, cls_token=True)
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0))
        # Recipes without noise build no embedding: the stand-in adds zero.
        self.noise_embed = (
            NoiseLevelEmbed(dim, noise_sigma_max, noise_sinusoid_dim) if noise_sigma_max > 0 else NoNoiseLevel()
        )
        self.decoder_blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """latent: (N, 1 + K, D) encoder output (cls first); ids_restore: (N, L); sigma: (N,) noise levels.

        Returns pred: (N, L, p*p*3) in patch order: pixels at masked patches, the added noise at visible ones.
        """
        x = self.decoder_embed(latent)
        n, k1, dim = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(n, L + 1 - k1, -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [visible..., masked...]
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))  # back in patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)  # fp32 buffer under bf16
        x = x + self.noise_embed(sigma)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, 1:])  # the cls token predicts nothing
