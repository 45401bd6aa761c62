"""Every model under DeepSpeed's bf16 cast (parameters bf16, buffers left float32), with the float32 views the loader
hands over: what the production configs run, checked on CPU. `.bfloat16()` would cast the buffers too and hide the
mix (the sin-cos position embeddings are buffers)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from jobs.engine import has_batchnorm, resolve_precision
from jobs.errors import ConfigError
from model.build import build_model
from model.config import ModelConfig
from model.noise import sample_noise
from model.recipes import RECIPES

B, SIZE, PATCH = 4, 32, 8


def config(recipe: str, backbone: str = "vit") -> ModelConfig:
    byol = RECIPES[recipe].family == "byol"
    return ModelConfig(preset="vit_tiny", img_size=SIZE, patch_size=PATCH, recipe=recipe, backbone=backbone,
                       resnet_width=8, decoder_dim=64, decoder_depth=1, decoder_heads=2, proj_hidden_dim=64,
                       pred_hidden_dim=64 if byol else None)


def deepspeed_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """What deepspeed.initialize does with bf16 enabled (engine._cast_module_mixed_precision): parameters only."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def inputs(recipe: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = (SIZE // PATCH) ** 2
    out = {"view1": torch.randn(B, 3, SIZE, SIZE, generator=g), "mask_keys1": torch.rand(B, L, generator=g),
           "labels": torch.arange(B) % 2}
    if RECIPES[recipe].num_views == 2:
        out.update(view2=torch.randn(B, 3, SIZE, SIZE, generator=g), mask_keys2=torch.rand(B, L, generator=g))
    return out


CASES = [(r, "vit") for r in RECIPES] + [(r, "resnet50") for r, spec in RECIPES.items() if spec.family != "can"]


@pytest.mark.parametrize("recipe,backbone", CASES)
def test_production_precision_trains_every_recipe(recipe, backbone):
    """Models without BatchNorm run with bf16 weights; models with it run under autocast with float32 weights
    (amp_bf16: resolve_precision picks it on CUDA and refuses bf16 for them, since torch's BatchNorm will not mix bf16
    weights with the float32 running statistics DeepSpeed leaves). Either way the losses are the float32 model's to
    bf16 accuracy (autocast: the BatchNorm of tiny batches amplifies rounding), and every gradient is finite."""
    torch.manual_seed(0)
    reference = build_model(config(recipe, backbone))
    model = build_model(config(recipe, backbone))
    model.load_state_dict(reference.state_dict())
    if has_batchnorm(model):
        assert resolve_precision("auto", True, "adamw", True) == "amp_bf16"
        with pytest.raises(ConfigError, match="deepspeed.precision: bf16"):
            resolve_precision("bf16", True, "adamw", True)
        precision, tolerance = torch.autocast("cpu", dtype=torch.bfloat16), 0.15  # BatchNorm of 8-image batches
    else:
        assert resolve_precision("auto", True, "adamw", False) == "bf16"
        deepspeed_bf16(model)
        assert backbone != "vit" or model.encoder.pos_embed.dtype == torch.float32
        precision, tolerance = contextlib.nullcontext(), 0.05
    torch.manual_seed(1)  # the same noise in both models
    expected = reference(**inputs(recipe))
    torch.manual_seed(1)
    with precision:
        got = model(**inputs(recipe))
    got["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for term, value in expected.items():
        assert got[term].float().item() == pytest.approx(value.item(), rel=tolerance, abs=0.02), term


def test_can_noise_reaches_the_encoder_in_bf16():
    """The denoise target is exactly the noise the encoder's input carries: pixels + noise reach the patch projection
    in float32 and are projected in float32 (model/vit.py PatchEmbed), then rounded once to bf16 tokens. The trainer
    used to cast the views to bf16 before the noise was added: at sigma 0.01 the noise actually added then differed
    from the target by 17% (N(0, 1) pixels; more on real images' wider range, and 60% at sigma 0.002)."""
    model = deepspeed_bf16(build_model(config("can")))
    pe = model.encoder.patch_embed
    seen = []
    pe.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    x = inputs("can")
    torch.manual_seed(3)
    model(**x)
    imgs = torch.cat([x["view1"], x["view2"]])
    torch.manual_seed(3)
    noise, sigma = sample_noise(imgs, model.noise_sigma_max)  # what CANModel drew: its denoise target
    pixels, tokens = seen[0]
    assert noise.dtype == torch.float32 and sigma.min() < 0.01  # small sigmas are in the batch
    assert pixels.dtype == torch.float32 and torch.equal(pixels, imgs + noise)
    w, b = pe.proj.weight.float(), pe.proj.bias.float()
    exact = torch.nn.functional.conv2d(imgs + noise, w, b, stride=PATCH).flatten(2).transpose(1, 2)
    assert tokens.dtype == torch.bfloat16 and torch.equal(tokens, exact.to(torch.bfloat16))
