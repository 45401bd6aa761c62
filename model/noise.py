"""Noise injection (CAN's third term) and the noise-level embedding the decoder is conditioned on."""

from __future__ import annotations

import math

import torch
from torch import nn


def sample_noise(imgs: torch.Tensor, sigma_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """imgs: (N, C, H, W) -> noise (N, C, H, W) = sigma * eps and sigma (N,), sigma ~ U[0, sigma_max) per image.

    The noise lives in normalised-pixel space: the encoder input is imgs + noise, the denoise target is noise.
    """
    sigma = torch.rand(imgs.shape[0], device=imgs.device, dtype=imgs.dtype) * sigma_max
    noise = sigma.view(-1, 1, 1, 1) * torch.randn_like(imgs)
    return noise, sigma


def sinusoid_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: (N,) scalars -> (N, dim): [cos(t * f_i), sin(t * f_i)], f_i geometric from 1 to 1/max_period (DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class NoiseLevelEmbed(nn.Module):
    """sigma (N,) -> (N, 1, dim): MLP(sinusoid(sigma)), added to every decoder token so it knows how much to remove.

    sigma in [0, sigma_max) is mapped to [0, 1000) first: the range DDPM's timestep sinusoids are laid out for (a
    raw sigma of 0.05 would leave every frequency but the highest near its value at 0).
    """

    def __init__(self, dim: int, sigma_max: float, sinusoid_dim: int = 256):
        super().__init__()
        self.scale = 1000.0 / sigma_max
        self.sinusoid_dim = sinusoid_dim
        self.mlp = nn.Sequential(nn.Linear(sinusoid_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        emb = sinusoid_embedding(sigma * self.scale, self.sinusoid_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb).unsqueeze(1)


class NoNoiseLevel(nn.Module):
    """Stands in for NoiseLevelEmbed in recipes without noise: adds nothing and holds no parameters."""

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.new_zeros(())
