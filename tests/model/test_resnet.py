"""ResNet-50: torchvision's names and shapes (a list written out by hand), zero-init, FLOPs, export and back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from model.build import build_model
from model.config import ModelConfig
from model.export import export_encoder, load_encoder
from model.flops_resnet import resnet_forward_flops
from model.resnet import resnet50
from tools.export import main as export_cli

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def bn(name: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{s}": (() if s == "num_batches_tracked" else (c,)) for s in BN}


def torchvision_resnet50_keys() -> dict[str, tuple[int, ...]]:
    """torchvision.models.resnet50().state_dict() without fc.weight / fc.bias: 320 - 2 = 318 tensors."""
    keys = {"conv1.weight": (64, 3, 7, 7)} | bn("bn1", 64)
    in_planes = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for i in range(blocks):
            b = f"layer{stage}.{i}."
            keys |= {b + "conv1.weight": (planes, in_planes, 1, 1)} | bn(b + "bn1", planes)
            keys |= {b + "conv2.weight": (planes, planes, 3, 3)} | bn(b + "bn2", planes)
            keys |= {b + "conv3.weight": (4 * planes, planes, 1, 1)} | bn(b + "bn3", 4 * planes)
            if i == 0:
                keys |= {b + "downsample.0.weight": (4 * planes, in_planes, 1, 1)} | bn(b + "downsample.1", 4 * planes)
            in_planes = 4 * planes
    return keys


def test_names_and_shapes_are_torchvisions():
    net = resnet50()
    state = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    expected = torchvision_resnet50_keys()
    assert len(expected) == 318 and len(state) == 318
    assert state == expected
    # A few entries spelled out, in case the list above and the model share a mistake.
    assert state["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert state["layer2.0.conv2.weight"] == (128, 128, 3, 3)  # stride 2 on the 3x3 (v1.5)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)
    assert state["layer4.2.bn3.running_var"] == (2048,)
    assert "layer1.1.downsample.0.weight" not in state
    # torchvision's 25,557,032 parameters minus the classifier's 2048 * 1000 + 1000.
    assert sum(p.numel() for p in net.parameters()) == 25_557_032 - 2_049_000


def test_forward_gives_pooled_2048_features():
    net = resnet50().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = net.forward_features(x)
    assert feats.shape == (2, 2048, 2, 2) and torch.isfinite(feats).all()
    assert torch.allclose(net.forward_head(feats), feats.mean((2, 3)))
    with pytest.raises(ValueError):
        net.forward_head(feats, pre_logits=False)


def test_zero_init_residual_makes_blocks_start_as_identity():
    net = resnet50(width=8, zero_init_residual=True).eval()
    assert all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight)) for s in range(1, 5)
               for b in getattr(net, f"layer{s}"))  # fmt: skip
    assert torch.equal(net.layer1[0].bn1.weight, torch.ones(8))
    block = net.layer1[1]  # no downsample: output = relu(x)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(x), torch.relu(x))
    assert not torch.equal(resnet50(width=8).eval().layer1[1](x), torch.relu(x))


def test_analytic_flops_match_torchvision_and_the_counter():
    # torchvision's table: 4.09 GMACs for ResNet-50 at 224, of which the classifier (absent here) is 2.05 M.
    assert resnet_forward_flops(224) / 2 == pytest.approx(4.09e9 - 2.048e6, rel=1e-3)
    net = resnet50(width=8).eval()  # batch 1: BatchNorm needs running statistics
    for side in (32, 40):
        with FlopCounterMode(display=False) as counter:
            net(torch.randn(1, 3, side, side))
        assert counter.get_total_flops() == resnet_forward_flops(side, width=8)


TINY = dict(backbone="resnet50", resnet_width=8, img_size=32, proj_hidden_dim=32, pred_hidden_dim=32)


@pytest.mark.parametrize("wrap", ["plain", "module_key"])
def test_export_round_trip_takes_the_online_encoder(tmp_path, wrap):
    torch.manual_seed(0)
    model = build_model(ModelConfig(recipe="mscn_byol", **TINY))
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))  # moves BN running statistics off their init
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(1.0)  # the target differs: export must not pick it
    state = model.state_dict() if wrap == "plain" else {"module": model.state_dict(), "step": 3}
    meta = export_encoder(state, tmp_path / "enc.safetensors", img_size=32)
    assert meta == json.loads((tmp_path / "enc.json").read_text())
    assert meta == {"arch": "resnet50", "torchvision_model": None, "timm_model": None, "img_size": 32, "width": 8,
                    "layers": [3, 4, 6, 3], "num_features": 256, "global_pool": "avg"}  # fmt: skip
    tensors = load_file(str(tmp_path / "enc.safetensors"))
    assert len(tensors) == 318 and tensors["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert tensors["layer1.0.bn1.num_batches_tracked"].item() == 1
    net = load_encoder(tmp_path / "enc.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), model.encoder.eval()(x))


def test_cli_exports_a_full_resnet50_with_torchvisions_names(tmp_path, capsys):
    model = build_model(ModelConfig(recipe="mscn_simclr", backbone="resnet50", img_size=64))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ckpt.pt")
    export_cli([str(tmp_path / "ckpt.pt"), str(tmp_path / "enc.safetensors"), "--img-size", "64"])
    meta = json.loads(capsys.readouterr().out)
    assert meta["torchvision_model"] == "resnet50" and meta["img_size"] == 64 and meta["num_features"] == 2048
    tensors = load_file(str(tmp_path / "enc.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == torchvision_resnet50_keys()
