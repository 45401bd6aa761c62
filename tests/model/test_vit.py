"""The ViT encoder: every preset builds and runs, timm's names, and the visible-token forward."""

from __future__ import annotations

import pytest
import torch

from model.pos_embed import get_2d_sincos_pos_embed
from model.presets import VIT_PRESETS, ViTPreset
from model.vit import VisionTransformer, vit_from_preset

# Real forward passes on small images for the small presets; the meta device gives the shapes of the big ones
# without allocating their weights (vit_huge is 630M parameters).
REAL = {"vit_micro", "vit_tiny", "vit_small", "vit_base"}


@pytest.mark.parametrize("preset", sorted(VIT_PRESETS))
def test_preset_builds_with_the_papers_shapes(preset):
    """Every preset, the large ones on the meta device (shapes only: vit_huge is 630M parameters); the small ones
    also give finite outputs (test_small_presets_give_finite_outputs)."""
    p = VIT_PRESETS[preset]
    img = 2 * p.patch_size  # 2 x 2 patches
    device = "cpu" if preset in REAL else "meta"
    with torch.device(device):
        vit = vit_from_preset(preset, img_size=img)
        feats = vit.forward_features(torch.randn(2, 3, img, img))
        pooled = vit.forward_head(feats, pre_logits=True)
    assert feats.shape == (2, 1 + 4, p.embed_dim)
    assert pooled.shape == (2, p.embed_dim)
    assert len(vit.blocks) == p.depth and vit.blocks[0].attn.num_heads == p.num_heads
    assert vit.patch_embed.proj.kernel_size == (p.patch_size, p.patch_size)


@pytest.mark.parametrize("preset", sorted(REAL))
def test_small_presets_give_finite_outputs(preset):
    p = VIT_PRESETS[preset]
    img = 2 * p.patch_size
    torch.manual_seed(0)
    feats = vit_from_preset(preset, img_size=img).forward_features(torch.randn(2, 3, img, img))
    assert torch.isfinite(feats).all() and feats.std() > 0.1


def test_presets_match_the_vit_paper():
    """The paper's sizes, named as timm names them; vit_micro (vit_tiny at half depth, for CPU proofs) is ours."""
    widths = {n: (p.embed_dim, p.depth, p.num_heads, p.patch_size) for n, p in VIT_PRESETS.items() if p.in_timm}
    assert VIT_PRESETS["vit_micro"] == ViTPreset(embed_dim=192, depth=6, num_heads=3, in_timm=False)
    assert widths == {
        "vit_tiny": (192, 12, 3, 16),
        "vit_small": (384, 12, 6, 16),
        "vit_base": (768, 12, 12, 16),
        "vit_large": (1024, 24, 16, 16),
        "vit_huge": (1280, 32, 16, 14),
    }


def small_vit(**kw) -> VisionTransformer:
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2) | kw
    return VisionTransformer(**args)


def test_parameter_names_are_timms():
    names = {n for n, _ in small_vit().state_dict().items()}
    per_block = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    expected = {"cls_token", "pos_embed", "norm.weight", "norm.bias"}
    expected |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    expected |= {f"blocks.{i}.{m}.{wb}" for i in range(2) for m in per_block for wb in ("weight", "bias")}
    assert names == expected


def test_pos_embed_is_fixed_sincos_with_zero_cls():
    vit = small_vit()
    assert "pos_embed" not in dict(vit.named_parameters())  # fixed: never trained
    pos = vit.pos_embed[0]
    assert torch.equal(pos[0], torch.zeros(32))
    # MAE's layout: first half encodes the column, second half the row; position (0, 0) is sin 0 = 0, cos 0 = 1.
    grid = pos[1:].reshape(4, 4, 32)
    assert torch.allclose(grid[0, 0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    assert torch.allclose(grid[:, 2, :16], grid[0, 2, :16].expand(4, 16))  # same column, same first half
    assert torch.allclose(grid[1, :, 16:], grid[1, 0, 16:].expand(4, 16))  # same row, same second half
    assert torch.allclose(grid[0, 1, 0], torch.sin(torch.tensor(1.0)))
    assert torch.allclose(get_2d_sincos_pos_embed(32, 4), pos[1:])


def test_attention_equals_softmax_reference():
    vit = small_vit()
    attn = vit.blocks[0].attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 16**0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_forward_encoder_on_all_patches_equals_forward_features():
    vit = small_vit()
    x = torch.randn(2, 3, 16, 16)
    ids = torch.arange(16).expand(2, 16)
    assert torch.allclose(vit.forward_encoder(x, ids), vit.forward_features(x), atol=1e-6)


def test_forward_encoder_never_sees_the_dropped_patches():
    vit = small_vit()
    x = torch.randn(2, 3, 16, 16)
    ids_keep = torch.tensor([[0, 5, 10, 15], [3, 2, 1, 0]])
    out = vit.forward_encoder(x, ids_keep)
    assert out.shape == (2, 5, 32)
    y = x.clone()
    y[:, :, 4:8, 0:4] = 100.0  # patch 4 (row 1, column 0): dropped in both images
    assert torch.allclose(vit.forward_encoder(y, ids_keep), out, atol=1e-6)
    y[0, :, 4:8, 4:8] = 100.0  # patch 5: kept in image 0 only
    changed = (vit.forward_encoder(y, ids_keep) - out).abs().amax(dim=(1, 2))
    assert changed[0] > 1e-3 and changed[1] < 1e-6


def test_forward_head_pools_patch_tokens_or_cls():
    feats = torch.randn(2, 5, 32)
    assert torch.allclose(small_vit().forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    assert torch.equal(small_vit(global_pool="token").forward_head(feats, pre_logits=True), feats[:, 0])
    logits = small_vit(num_classes=7).forward_head(feats)
    assert logits.shape == (2, 7)


def test_init_is_maes():
    vit = small_vit()
    assert abs(vit.cls_token.std().item() - 0.02) < 0.01
    assert torch.equal(vit.blocks[0].attn.qkv.bias, torch.zeros(96))
    assert torch.equal(vit.blocks[0].norm1.weight, torch.ones(32))
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.norm.eps == 1e-6
    bound = (6 / (32 + 96)) ** 0.5  # xavier_uniform on a (96, 32) weight
    assert vit.blocks[0].attn.qkv.weight.abs().max() <= bound
    assert vit.blocks[0].attn.qkv.weight.abs().max() > 0.9 * bound


def test_drop_path_is_stochastic_in_training_only():
    vit = small_vit(drop_path=0.5)
    x = torch.randn(4, 3, 16, 16)
    vit.eval()
    assert torch.equal(vit.forward_features(x), vit.forward_features(x))
    vit.train()
    torch.manual_seed(0)
    a = vit.forward_features(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, vit.forward_features(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: flash attention kernels run on GPU only")
def test_flash_attention_matches_math_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vit = vit_from_preset("vit_small", img_size=64).cuda().to(torch.bfloat16).eval()
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these shapes
            flash = vit.forward_features(x)
        with sdpa_kernel(SDPBackend.MATH):
            math = vit.forward_features(x)
    assert torch.allclose(flash.float(), math.float(), atol=5e-2, rtol=5e-2)
