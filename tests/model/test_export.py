"""Export to timm's names and shapes (a list written out by hand) and back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.can import build_model
from model.config import ModelConfig
from model.export import export_encoder, load_encoder
from tools.export import export_checkpoint
from tools.export import main as export_cli


def timm_vit_tiny_224_keys() -> dict[str, tuple[int, ...]]:
    """timm's vit_tiny_patch16_224 with num_classes=0: 4 + 12 * 12 + 2 = 150 tensors."""
    d, hidden = 192, 768
    keys = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        keys |= {
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
        }  # fmt: skip
    keys |= {"norm.weight": (d,), "norm.bias": (d,)}
    return keys


def test_export_has_timms_names_and_shapes(tmp_path):
    model = build_model(ModelConfig(preset="vit_tiny", img_size=224, recipe="mae", decoder_depth=1))
    meta = export_encoder(model.state_dict(), tmp_path / "enc.safetensors")
    tensors = load_file(str(tmp_path / "enc.safetensors"))
    expected = timm_vit_tiny_224_keys()
    assert len(expected) == 150
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert meta == json.loads((tmp_path / "enc.json").read_text())
    assert meta | {"global_pool": None} == {
        "preset": "vit_tiny", "timm_model": "vit_tiny_patch16_224", "img_size": 224, "patch_size": 16,
        "embed_dim": 192, "depth": 12, "num_heads": 3, "global_pool": None,
    }  # fmt: skip


TINY = ModelConfig(preset="vit_tiny", img_size=16, patch_size=4, recipe="simclr", global_pool="token")


@pytest.mark.parametrize("wrap", ["plain", "module_key", "module_prefix"])
def test_checkpoint_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    state = model.state_dict()
    state = {
        "plain": state,
        "module_key": {"module": state, "step": 7},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(state, tmp_path / "ckpt.pt")
    export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out" / "enc.safetensors", global_pool="token")
    encoder = load_encoder(tmp_path / "out" / "enc.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder.forward_features(x), model.encoder.forward_features(x))
        assert torch.equal(encoder.forward_head(encoder.forward_features(x), pre_logits=True),
                           model.encoder.forward_head(model.encoder.forward_features(x), pre_logits=True))


def test_cli_and_a_bare_encoder_state_dict(tmp_path, capsys):
    model = build_model(TINY)
    torch.save(model.encoder.state_dict(), tmp_path / "enc.pt")
    export_cli([str(tmp_path / "enc.pt"), str(tmp_path / "enc.safetensors"), "--preset", "vit_tiny"])
    assert json.loads(capsys.readouterr().out)["timm_model"] == "vit_tiny_patch4_16"
    assert torch.equal(load_encoder(tmp_path / "enc.safetensors").cls_token, model.encoder.cls_token)


def test_state_dict_without_an_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError):
        export_encoder({"decoder.mask_token": torch.zeros(1, 1, 8)}, tmp_path / "x.safetensors")
