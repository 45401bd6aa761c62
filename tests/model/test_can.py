"""The CAN model end to end on tiny inputs: recipes, gradients, determinism, parameter groups."""

from __future__ import annotations

import pytest
import torch

from model.can import build_model
from model.config import ModelConfig
from model.recipes import RECIPES

TINY = dict(preset="vit_tiny", img_size=16, patch_size=4, decoder_dim=32, decoder_depth=1, decoder_heads=2)
TERMS = {
    "can": {"contrastive", "reconstruction", "denoise"},
    "can_no_noise": {"contrastive", "reconstruction"},
    "mae": {"reconstruction"},
    "simclr": {"contrastive"},
}


def views(model, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    vs = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(model.num_views)]
    return dict(zip(("view1", "view2"), vs))


def test_every_can_family_recipe_is_covered_here():
    assert {r for r, spec in RECIPES.items() if spec.family == "can"} == set(TERMS)


@pytest.mark.parametrize("recipe", sorted(TERMS))
def test_recipe_returns_its_terms_and_weighted_loss(recipe):
    model = build_model(ModelConfig(recipe=recipe, **TINY))
    out = model(**views(model))
    assert set(out) == TERMS[recipe] | {"loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    expected = sum(model.recipe.weights[t] * out[t] for t in TERMS[recipe])
    assert torch.allclose(out["loss"], expected)
    assert model.num_patches == 16 and model.num_views == (1 if recipe == "mae" else 2)


def test_recipe_weights_are_the_spec():
    assert RECIPES["can"].weights == {"contrastive": 0.03, "reconstruction": 0.67, "denoise": 0.30}
    assert RECIPES["can_no_noise"].weights == {"contrastive": 0.03, "reconstruction": 0.97}
    assert RECIPES["mae"].weights == {"reconstruction": 1.0} and RECIPES["mae"].mask_ratio == 0.75
    assert RECIPES["simclr"].weights == {"contrastive": 1.0} and RECIPES["simclr"].mask_ratio == 0.0


def test_turned_off_terms_build_no_modules():
    names = {r: {n for n, _ in build_model(ModelConfig(recipe=r, **TINY)).named_parameters()} for r in TERMS}
    assert not any(n.startswith("decoder.") for n in names["simclr"])
    assert not any(n.startswith("projector.") for n in names["mae"])
    assert not any("noise_embed" in n for n in names["can_no_noise"] | names["mae"])
    assert any("noise_embed" in n for n in names["can"])


def test_every_can_parameter_gets_a_gradient():
    model = build_model(ModelConfig(recipe="can", **TINY))
    model(**views(model))["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_seeded_runs_are_identical_and_seeds_matter():
    def run(seed):
        torch.manual_seed(seed)
        model = build_model(ModelConfig(recipe="can", **TINY))
        out = model(**views(model))
        out["loss"].backward()
        return out["loss"].detach(), model.encoder.blocks[0].attn.qkv.weight.grad.clone()

    (l1, g1), (l2, g2), (l3, _) = run(0), run(0), run(1)
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert not torch.equal(l1, l3)


def test_handed_in_mask_keys_decide_the_mask():
    model = build_model(ModelConfig(recipe="mae", **TINY))
    v = views(model)
    keys = torch.rand(4, 16)
    assert torch.equal(model(**v, mask_keys1=keys)["loss"], model(**v, mask_keys1=keys)["loss"])
    assert not torch.equal(model(**v, mask_keys1=keys)["loss"], model(**v, mask_keys1=torch.rand(4, 16))["loss"])


def test_wrong_number_of_views_is_an_error():
    mae = build_model(ModelConfig(recipe="mae", **TINY))
    can = build_model(ModelConfig(recipe="can", **TINY))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError):
        mae(x, x)
    with pytest.raises(ValueError):
        can(x)


def test_config_overrides_and_bad_combinations():
    model = build_model(ModelConfig(recipe="can", mask_ratio=0.75, denoise_weight=0.5, **TINY))
    assert model.mask_ratio == 0.75 and model.recipe.weights["denoise"] == 0.5
    with pytest.raises(ValueError):
        build_model(ModelConfig(recipe="mae", denoise_weight=0.3, **TINY))  # denoise without noise
    with pytest.raises(ValueError):
        ModelConfig(preset="vit_giant")


def test_param_groups_skip_decay_on_biases_norms_and_tokens():
    model = build_model(ModelConfig(recipe="can", proj_batchnorm=True, **TINY))
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {by_id[id(p)] for p in no_decay["params"]}
    decay_names = {by_id[id(p)] for p in decay["params"]}
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.norm.weight", "encoder.blocks.0.attn.qkv.bias"} <= (
        no_decay_names
    )
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "projector.0.weight"} <= decay_names
    assert "projector.1.weight" in no_decay_names  # BatchNorm
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_projector_is_configurable():
    model = build_model(ModelConfig(recipe="simclr", proj_hidden_dim=64, proj_out_dim=32, proj_depth=3, **TINY))
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(192, 64), (64, 64), (64, 32)]
