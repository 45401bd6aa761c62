"""patchify / unpatchify, exact-count masking and noise injection."""

from __future__ import annotations

import torch

from model.masking import num_kept, random_masking
from model.noise import NoiseLevelEmbed, sample_noise
from model.patches import normalize_patches, patchify, unpatchify


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 12, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 9, 4 * 4 * 3)
    assert torch.equal(unpatchify(p, 4), x)


def test_patchify_layout_is_maes():
    x = torch.randn(1, 3, 8, 8)
    p = patchify(x, 4)
    # Patch 1 is row 0, column 1; inside it the pixels run (row, column, channel).
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))


def test_normalize_patches_gives_zero_mean_unit_variance():
    p = normalize_patches(torch.randn(2, 4, 48) * 3 + 1)
    assert torch.allclose(p.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(p.var(-1), torch.ones(2, 4), atol=1e-4)


def test_every_image_masks_exactly_round_l_ratio():
    for L, ratio in [(196, 0.5), (196, 0.75), (49, 0.5), (16, 0.3), (64, 0.0)]:
        ids_keep, mask, ids_restore = random_masking(torch.rand(5, L), ratio)
        assert torch.equal(mask.sum(1), torch.full((5,), float(round(L * ratio))))
        assert ids_keep.shape == (5, L - round(L * ratio)) == (5, num_kept(L, ratio))
        # the kept ids are exactly the unmasked patches
        assert torch.equal(torch.gather(mask, 1, ids_keep), torch.zeros_like(ids_keep, dtype=mask.dtype))
        assert torch.equal(torch.gather(torch.argsort(ids_restore, 1), 1, ids_restore), torch.arange(L).expand(5, L))


def test_smallest_keys_are_kept():
    keys = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, mask, _ = random_masking(keys, 0.5)
    assert sorted(ids_keep[0].tolist()) == [1, 3]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_masks_differ_across_images_and_views():
    torch.manual_seed(0)
    _, mask, _ = random_masking(torch.rand(2 * 8, 64), 0.5)  # 2 views x 8 images on the batch axis
    assert len({tuple(m.tolist()) for m in mask}) == 16


def test_noise_is_zero_without_sigma():
    imgs = torch.randn(4, 3, 8, 8)
    noise, sigma = sample_noise(imgs, 0.0)
    assert torch.equal(noise, torch.zeros_like(imgs)) and torch.equal(sigma, torch.zeros(4))


def test_noise_level_is_per_image_below_sigma_max():
    torch.manual_seed(0)
    imgs = torch.zeros(256, 3, 16, 16)
    noise, sigma = sample_noise(imgs, 0.05)
    assert sigma.shape == (256,) and (sigma >= 0).all() and (sigma < 0.05).all()
    assert len(set(sigma.tolist())) == 256
    # each image's noise has the std of its own sigma
    assert torch.allclose(noise.flatten(1).std(1), sigma, rtol=0.1, atol=1e-3)


def test_noise_level_embedding_tells_levels_apart():
    embed = NoiseLevelEmbed(dim=16, sigma_max=0.05)
    out = embed(torch.tensor([0.0, 0.01, 0.049]))
    assert out.shape == (3, 1, 16)
    assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
