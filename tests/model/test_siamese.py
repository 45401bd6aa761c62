"""The joint-embedding recipes through the one build_model: classes, terms, multi-mask pairs, LARS groups, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.build import MODELS, build_model
from model.byol import BYOLModel
from model.can import CANModel
from model.can import build_model as build_can
from model.config import ModelConfig
from model.distributed import convert_sync_batchnorm
from model.flops import forward_flops_breakdown, train_flops_per_image
from model.flops_resnet import resnet_forward_flops
from model.losses import info_nce, supcon
from model.recipes import RECIPES
from model.siamese import SiameseModel

RESNET = dict(backbone="resnet50", resnet_width=8, img_size=32)
VIT = dict(backbone="vit", preset="vit_tiny", img_size=16, patch_size=8)
HEADS = dict(proj_hidden_dim=32)


def heads(recipe: str) -> dict:
    """Narrow heads for speed; only BYOL has a predictor to narrow (setting it elsewhere is a config error)."""
    return HEADS | ({"pred_hidden_dim": 32} if recipe == "mscn_byol" else {})
EXPECTED = {"mscn_simclr": (SiameseModel, "contrastive"), "mscn_byol": (BYOLModel, "byol"),
            "supcon": (SiameseModel, "supcon")}  # fmt: skip


def batch(side, b=4, extra=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"view1": torch.randn(b, 3, side, side, generator=g), "view2": torch.randn(b, 3, side, side, generator=g),
           "labels": torch.tensor([0, 1, 0, -1])[:b]}  # fmt: skip
    if extra:
        out["views_extra"] = torch.randn(b, extra, 3, side, side, generator=g)
    return out


@pytest.mark.parametrize("backbone", [RESNET, VIT], ids=["resnet50", "vit"])
@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_each_recipe_builds_its_model_and_term(recipe, backbone):
    model = build_model(ModelConfig(recipe=recipe, **backbone, **heads(recipe)))
    cls, term = EXPECTED[recipe]
    assert type(model) is cls and model.num_views == 2
    out = model(**batch(backbone["img_size"]))
    assert set(out) == {"loss", term} and all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss"], RECIPES[recipe].weights[term] * out[term])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_every_recipe_has_a_model_and_can_stays_can():
    assert {spec.family for spec in RECIPES.values()} <= set(MODELS)
    assert type(build_model(ModelConfig(recipe="mae", preset="vit_tiny", img_size=16, patch_size=8))) is CANModel
    with pytest.raises(ValueError):
        build_can(ModelConfig(recipe="supcon", **VIT))  # the CAN class refuses a siamese recipe
    with pytest.raises(ValueError):
        ModelConfig(recipe="can", backbone="resnet50")  # CAN needs the ViT's tokens
    with pytest.raises(ValueError):
        ModelConfig(recipe="supcon", backbone="resnet18")
    with pytest.raises(ValueError):
        build_model(ModelConfig(recipe="mscn_simclr", pred_hidden_dim=64, **VIT))  # no predictor in SimCLR


def test_can_accepts_and_ignores_labels():
    model = build_model(ModelConfig(recipe="simclr", preset="vit_tiny", img_size=16, patch_size=8))
    b = batch(16)
    keys = torch.rand(2, 4, 4)
    with_labels = model(b["view1"], b["view2"], keys[0], keys[1], labels=b["labels"])
    assert torch.equal(with_labels["loss"], model(b["view1"], b["view2"], keys[0], keys[1])["loss"])


@pytest.mark.parametrize("recipe, loss", [("mscn_simclr", "info_nce"), ("supcon", "supcon")])
def test_extra_masks_pair_with_the_other_branch_only(recipe, loss):
    """(view1, view2), (extra_1, view2), (extra_2, view2), averaged; never (view1, extra_m)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(recipe=recipe, extra_masks=2, **RESNET, **HEADS))
    b = batch(32, extra=2)
    out = model(**b)
    stacked = torch.cat([b["view1"], b["view2"], b["views_extra"][:, 0], b["views_extra"][:, 1]])
    z = model.embed(stacked).unflatten(0, (4, 4))  # same batch -> same BatchNorm statistics
    if loss == "info_nce":
        per_pair = [info_nce(z[a], z[1], 0.1) for a in (0, 2, 3)]
    else:
        per_pair = [supcon(z[a], z[1], b["labels"], 0.1) for a in (0, 2, 3)]
    term = "contrastive" if recipe == "mscn_simclr" else "supcon"
    assert torch.allclose(out[term], torch.stack(per_pair).mean(), atol=1e-5)
    with pytest.raises(ValueError):
        model(b["view1"], b["view2"])  # configured for 2 extra masks, given none


def test_supcon_without_labels_is_an_error():
    model = build_model(ModelConfig(recipe="supcon", **VIT))
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16))


def test_mscn_simclr_head_is_the_papers():
    model = build_model(ModelConfig(recipe="mscn_simclr", backbone="resnet50", img_size=32))
    kinds = [(type(m).__name__, getattr(m, "in_features", getattr(m, "num_features", None))) for m in model.projector]
    assert kinds == [("Linear", 2048), ("BatchNorm1d", 2048), ("ReLU", None), ("Linear", 2048), ("BatchNorm1d", 256)]


def test_param_groups_exclude_bn_and_biases_from_decay_and_lars():
    model = build_model(ModelConfig(recipe="mscn_simclr", **RESNET, **HEADS))
    decay, excluded = model.param_groups(1e-6)
    assert decay == decay | {"weight_decay": 1e-6, "lars_exclude": False}
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names, excluded_names = {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in excluded["params"]}
    assert {"encoder.conv1.weight", "encoder.layer1.0.downsample.0.weight", "projector.0.weight"} <= decay_names
    assert {"encoder.bn1.weight", "encoder.layer4.2.bn3.bias", "projector.0.bias", "projector.1.weight"} <= (
        excluded_names
    )
    assert len(decay_names) + len(excluded_names) == len(list(model.parameters()))
    can_groups = build_model(ModelConfig(recipe="can", preset="vit_tiny", img_size=16, patch_size=8)).param_groups(0.05)
    assert [g["lars_exclude"] for g in can_groups] == [False, True]


def test_sync_batchnorm_keeps_names_and_is_a_no_op_on_one_process():
    model = build_model(ModelConfig(recipe="mscn_byol", **RESNET, **heads("mscn_byol")))
    assert convert_sync_batchnorm(model, torch.device("cpu")) is model
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # what a multi-GPU run gets
    assert list(synced.state_dict()) == list(model.state_dict())  # export and checkpoints see the same names


def test_flops_of_the_resnet_recipes():
    backbone = resnet_forward_flops(224)
    simclr = ModelConfig(recipe="mscn_simclr", backbone="resnet50")
    projector = 2 * (2048 * 2048 + 2048 * 256)
    assert forward_flops_breakdown(simclr)["encoder"] == 2 * backbone
    assert train_flops_per_image(simclr) == 3 * 2 * (backbone + projector)
    assert train_flops_per_image(simclr) / 1e9 == pytest.approx(49.1, abs=0.1)  # 2 views x 3 x 8.17 G + heads
    byol = ModelConfig(recipe="mscn_byol", backbone="resnet50")
    proj, pred = 2 * (2048 * 4096 + 4096 * 256), 2 * (256 * 4096 + 4096 * 256)
    assert train_flops_per_image(byol) == 3 * 2 * (backbone + proj + pred) + 2 * (backbone + proj)  # target 1x
    masked = ModelConfig(recipe="mscn_simclr", backbone="resnet50", extra_masks=2)
    assert train_flops_per_image(masked) == pytest.approx(2 * train_flops_per_image(simclr))
