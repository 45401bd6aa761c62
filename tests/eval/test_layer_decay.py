"""Layer-wise lr decay: ids per parameter and the scale each group gets."""

import pytest

from jobs.eval.layer_decay import layer_id, param_groups_lrd
from model.vit import vit_from_preset


def test_layer_ids():
    assert layer_id("cls_token", 12) == 0 and layer_id("encoder.patch_embed.proj.weight", 12) == 0
    assert layer_id("blocks.0.attn.qkv.weight", 12) == 1 and layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("norm.weight", 12) == 13 and layer_id("head.weight", 12) == 13


def test_groups_scale_and_decay():
    model = vit_from_preset("vit_tiny", img_size=16, patch_size=4, num_classes=10)
    groups = param_groups_lrd(model, depth=12, weight_decay=0.05, layer_decay=0.75)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.05
    assert by_name["head.bias"]["weight_decay"] == 0.0
    assert by_name["blocks.11.attn.qkv.weight"]["lr_scale"] == pytest.approx(0.75)
    assert by_name["cls_token"]["lr_scale"] == pytest.approx(0.75**13) and by_name["cls_token"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
