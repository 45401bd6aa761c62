"""Loss functions against brute-force references, and which patches each pixel term sees."""

from __future__ import annotations

import math

import pytest
import torch

from model.can import build_model
from model.config import ModelConfig
from model.losses import info_nce, masked_mse
from model.patches import normalize_patches, patchify


def info_nce_brute_force(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    z = [v / v.norm() for v in list(z1) + list(z2)]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = {j: float(z[i] @ z[j]) / t for j in range(2 * n) if j != i}
        total += -sims[positive] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


@pytest.mark.parametrize("n,t", [(1, 0.1), (4, 0.1), (5, 0.5)])
def test_info_nce_equals_brute_force(n, t):
    torch.manual_seed(n)
    z1, z2 = torch.randn(n, 8, dtype=torch.float64), torch.randn(n, 8, dtype=torch.float64)
    assert info_nce(z1, z2, t).item() == pytest.approx(info_nce_brute_force(z1, z2, t), rel=1e-9)


def test_info_nce_is_low_for_matching_views_and_scale_free():
    z = torch.randn(6, 16)
    assert info_nce(z, z, 0.1) < info_nce(z, torch.randn(6, 16), 0.1)
    assert torch.allclose(info_nce(z, 2 * z, 0.1), info_nce(z, z, 0.1))  # normalised inside


def test_masked_mse_counts_only_marked_patches():
    pred, target = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    pred[0, 0] = 2.0  # counted: squared error 4
    pred[1, 1, 0] = 4.0  # counted: mean over 4 values -> 4
    pred[0, 1] = 100.0  # not counted
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 4 + 0) / 3)


TINY = dict(preset="vit_tiny", img_size=16, patch_size=4, decoder_dim=32, decoder_depth=1, decoder_heads=2)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_each_pixel_term_sees_only_its_patches(norm_pix_loss):
    model = build_model(ModelConfig(recipe="can", norm_pix_loss=norm_pix_loss, **TINY))
    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 16, 16), 0.05 * torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, 16) < 0.5).float()  # 1 = masked
    clean = patchify(imgs, 4)
    clean = normalize_patches(clean) if norm_pix_loss else clean
    # The perfect prediction: clean pixels where masked, the added noise where visible -> both terms zero.
    perfect = torch.where(mask[..., None].bool(), clean, patchify(noise, 4))
    losses = model.forward_pixel_losses(imgs, noise, perfect, mask)
    assert losses["reconstruction"].item() == pytest.approx(0.0, abs=1e-10)
    assert losses["denoise"].item() == pytest.approx(0.0, abs=1e-10)

    masked_only = perfect + mask[..., None]  # move the masked predictions only
    moved = model.forward_pixel_losses(imgs, noise, masked_only, mask)
    assert moved["reconstruction"].item() == pytest.approx(1.0) and moved["denoise"].item() == 0.0
    visible_only = perfect + (1 - mask[..., None])  # move the visible predictions only
    moved = model.forward_pixel_losses(imgs, noise, visible_only, mask)
    assert moved["reconstruction"].item() == 0.0 and moved["denoise"].item() == pytest.approx(1.0)


def test_reconstruction_target_is_the_clean_view():
    model = build_model(ModelConfig(recipe="can", norm_pix_loss=False, **TINY))
    imgs, noise = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    mask = torch.ones(1, 16)
    noisy_pred = patchify(imgs + noise, 4)
    assert model.forward_pixel_losses(imgs, noise, patchify(imgs, 4), mask)["reconstruction"] == 0
    assert model.forward_pixel_losses(imgs, noise, noisy_pred, mask)["reconstruction"] > 0.5
